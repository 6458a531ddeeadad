# `make demo` and `make test` each set up .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
PYTEST  ?= $(PY) -m pytest

.PHONY: demo test test-slow test-gpu bench bench-gpu clean seed002 seed002-noise noise-pixel noise-label noise-clutter seed003 seed004 resvit gdt pareto

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vitlab train --config configs/quickstart.yaml --output output --savefile demo

test: $(STAMP)
	$(PYTEST) -q

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

test-gpu: $(STAMP)
	$(PYTEST) -q -m gpu

bench: $(STAMP)
	$(PY) bench/throughput.py

# Every GPU number (issue 15): one CUDA GPU, about 8 minutes; adds a dated section to bench/RESULTS.md
bench-gpu: $(STAMP)
	$(PY) bench/gpu.py

# Seed experiments in miniature (real MNIST in ../shared/data or DATA=...; CPU, minutes each): runs, table, plots, report.
DATA ?= ../shared/data
seed002: $(STAMP)
	$(PY) -m vitlab sweep configs/experiments/seed002_mnist.yaml --output output/sweeps/seed002_mnist
	$(PY) -m vitlab collect output/sweeps/seed002_mnist
	$(PY) -m vitlab plot output/sweeps/seed002_mnist --out output/sweeps/seed002_mnist/plots
	$(PY) -m vitlab report output/sweeps/seed002_mnist --out output/sweeps/seed002_mnist/report.html --title "Seed 002: classic vs differential ViT (MNIST)"

# Seed 002's hypothesis (issue 27): classic vs differential (V1, V2) ViTs under pixel noise, label noise and canvas
# clutter, 3 widths x 3 seeds each (189 runs, one thread each, two at a time: ~1.5 h on 2 cores); then the table
# with 95% intervals, paired differences, attention shares and figures. Rerun to resume: finished runs are skipped.
NOISE := output/seed002_noise
seed002-noise: $(STAMP)
	$(MAKE) -j2 noise-pixel noise-clutter noise-label
	$(PY) bench/seed002_noise.py $(NOISE)

noise-pixel noise-label noise-clutter: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m vitlab sweep configs/experiments/seed002_noise/$(@:noise-%=%).yaml --output $(NOISE)/$(@:noise-%=%)

seed003: $(STAMP)
	$(PY) -m vitlab compare configs/seed003/vit_mnist.yaml configs/seed003/rev_mnist.yaml configs/seed003/bdia_mnist.yaml configs/seed003/momentum_mnist.yaml --epochs 2 --output output/seed003_mnist
	$(PY) -m vitlab plot output/seed003_mnist --out output/seed003_mnist/plots --checkpoint output/seed003_mnist/bdia_mnist --data_dir $(DATA)
	$(PY) -m vitlab report output/seed003_mnist --out output/seed003_mnist/report.html --title "Seed 003: ViT, reversible, BDIA, momentum (MNIST)"

seed004: $(STAMP)
	$(PY) -m vitlab compare configs/tower_vit/tower_mnist.yaml configs/tower_vit/staged_mnist.yaml configs/tower_vit/pit_mnist.yaml --epochs 2 --output output/seed004_mnist
	$(PY) -m vitlab plot output/seed004_mnist --out output/seed004_mnist/plots --checkpoint output/seed004_mnist/pit_mnist --data_dir $(DATA)
	$(PY) -m vitlab report output/seed004_mnist --out output/seed004_mnist/report.html --title "Seed 004: TowerViT vs stage-wise ViT (MNIST)"

# Seed 001's claim on CPU: a plain ViT teacher on MNIST-on-canvas, Res-ViT fine-tuned from it (routing arms x
# target ratios x LoRA/full), equal-FLOPs depth cuts, learned vs random routing over seeds; then measured.
resvit: $(STAMP)
	$(PY) -m vitlab train --config configs/resvit/teacher_canvas.yaml --data_dir $(DATA) --reload
	$(PY) -m vitlab sweep configs/resvit/routing_canvas.yaml --output output/resvit_canvas/routing
	$(PY) -m vitlab sweep configs/resvit/depth_cut_canvas.yaml --output output/resvit_canvas/depth_cut
	$(PY) -m vitlab sweep configs/resvit/seeds_canvas.yaml --output output/resvit_canvas/seeds
	$(PY) bench/resvit.py output/resvit_canvas

gdt: $(STAMP)
	$(PY) -m vitlab sweep configs/gdt/uniform_canvas.yaml --output output/gdt_canvas/uniform
	$(PY) -m vitlab sweep configs/gdt/gdt_canvas.yaml --output output/gdt_canvas/gdt
	$(PY) -m vitlab sweep configs/gdt/content_canvas.yaml --output output/gdt_canvas/content
	$(PY) -m vitlab sweep configs/gdt/segment_canvas.yaml --output output/gdt_canvas/segment
	$(PY) bench/gdt.py output/gdt_canvas

# Issue 26: every way of spending fewer tokens on make gdt's task, one table and three pictures (~50 min on 2 cores)
pareto: $(STAMP)
	$(PY) -m vitlab sweep configs/pareto/uniform.yaml --output output/pareto
	$(PY) -m vitlab sweep configs/pareto/trees.yaml --output output/pareto
	$(PY) -m vitlab sweep configs/pareto/learned.yaml --output output/pareto
	$(PY) -m vitlab sweep configs/pareto/from_teacher.yaml --output output/pareto
	OMP_NUM_THREADS=1 $(PY) bench/token_reduction.py output/pareto --reference uniform_p8 --wide 384x6 --merge 4 8 16 --thresholds --rounds 11

clean:
	rm -rf output .pytest_cache
