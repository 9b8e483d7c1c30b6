# caffe-lmdb: every target installs what it needs, so `make demo` or `make test` works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# generated from proto/caffe.proto and proto/caffe2.proto (not committed: see docs/development.md)
PB2    := caffe_lmdb/caffe_pb2.py caffe_lmdb/caffe2_pb2.py
PROTOC := $(BIN)/python -m grpc_tools.protoc -I proto --python_out=caffe_lmdb --pyi_out=caffe_lmdb

.PHONY: venv proto demo test browser lint bench clean

# torch is pinned for dev/test and installed first: on these machines pip takes a local CPU wheel
# for exactly this version (any other spec pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q "setuptools>=64" wheel "grpcio-tools>=1.85,<1.86"
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	touch $@

venv: $(STAMP)

caffe_lmdb/%_pb2.py: proto/%.proto $(STAMP)
	$(PROTOC) $<

proto: $(STAMP)
	$(PROTOC) proto/caffe.proto proto/caffe2.proto

demo: $(STAMP) $(PB2)
	$(BIN)/python tools/convert.py img --overwrite
	$(BIN)/python tools/main.py img/train.lmdb

test: $(STAMP) $(PB2) browser
	$(BIN)/python -m pytest -q

# the browser test's Chromium (tests/test_serve_browser.py): installed with apt-get where that can be done
# (root, on Debian, as in CI); elsewhere that one test skips, saying why
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      >/dev/null; } || echo "chromium could not be installed: the browser test will skip"; \
	  else echo "no chromium/chromedriver, and apt-get needs root: the browser test will skip"; fi; fi

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(PB2)
	$(BIN)/python tools/bench.py --cold

clean:
	rm -rf $(VENV) $(PB2) $(PB2:.py=.pyi) .pytest_cache .ruff_cache *.egg-info build dist
	rm -rf img/*.lmdb img/*_keys.npy img/*classes.txt img/*skipped.txt bench-data bench-results.json
