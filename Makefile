# Two commands on a fresh machine: `make run` (the study on embedded data) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: venv run test lint bench clean sysdeps

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,ray]'
	touch $(STAMP)

# DCMTK (dcmsign, storescu) is the reference implementation our signatures and DICOM ingest
# are tested against; Orthanc is the real PACS of the end-to-end C-STORE test; the openssl
# command makes the CA/signer certificate shapes hospitals make with it.
sysdeps:
	@{ command -v dcmsign && command -v Orthanc && command -v openssl; } >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dcmtk orthanc openssl; }

run: venv
	$(BIN)/medsec reproduce --out results

test: venv sysdeps
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/python -m pytest -q

# torchattacks --no-deps: see the `bench` extra in pyproject.toml (keeps torch==2.13.0 CPU).
bench: venv sysdeps
	$(PIP) -e '.[bench]'
	$(PIP) --no-deps torchattacks==3.5.1
	$(BIN)/python benchmarks/attack_speed.py
	$(BIN)/python benchmarks/signature_speed.py
	$(BIN)/python benchmarks/service_load.py

clean:
	rm -rf $(VENV) results .medsec-cache
