PYTHON ?= .venv/bin/python

# --- the deep runs (README: "Reliability"); CI runs the short, seeded versions of the same tests ---------------
.PHONY: deep deep-tests
deep: deep-tests fuzz-deep

deep-tests:
	VDISK_DEEP=1 $(PYTHON) -m pytest -s tests/test_crash.py tests/test_powerloss.py tests/test_enospc.py \
		tests/test_qcow2_model.py tests/test_soak.py tests/test_large_disks.py tests/test_filesystems.py \
		tests/test_stream_consistency.py tests/test_stream_scale.py

# --- fuzzing (fuzz/) ---------------------------------------------------------------------------------------
# CI runs the short, seeded versions (tests/test_fuzz_*.py, tests/test_qmp_hostile.py, tests/test_limits.py).
# fuzz-deep runs every atheris target for FUZZ_SECONDS each (coverage-guided, scratch corpus in fuzz/work/
# seeded from fuzz/corpus/<target>/; findings land in fuzz/work/<target>/artifacts/), then random hostile NBD
# sessions against a real server for as long.  Keep a finding as fuzz/regressions/<target>/<name> with its fix.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS := qmp_framing qmp_arguments qcow2_header qcow2_image qcow2_image_rw
FUZZ_FLAGS ?= -rss_limit_mb=1024 -timeout=10 -print_final_stats=1

.PHONY: fuzz-deep fuzz-smoke fuzz-seeds $(addprefix fuzz-,$(FUZZ_TARGETS)) fuzz-nbd

fuzz-deep: $(addprefix fuzz-,$(FUZZ_TARGETS)) fuzz-nbd

fuzz-smoke:
	$(MAKE) fuzz-deep FUZZ_SECONDS=20

fuzz-seeds:
	$(PYTHON) -m fuzz.make_seeds

$(addprefix fuzz-,$(FUZZ_TARGETS)): fuzz-%:
	@mkdir -p fuzz/work/$*/corpus fuzz/work/$*/artifacts
	@$(PYTHON) -m fuzz.run $* $(FUZZ_FLAGS) -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=fuzz/work/$*/artifacts/ fuzz/work/$*/corpus \
		fuzz/corpus/$(if $(filter qcow2_image_rw,$*),qcow2_image,$*) > fuzz/work/$*.log 2>&1; \
		status=$$?; echo "$*: $$(grep -h -E '^Done|^stat::number_of_executed_units' fuzz/work/$*.log | tr '\n' ' ')"; \
		ls fuzz/work/$*/artifacts/; exit $$status

fuzz-nbd:
	$(PYTHON) -m fuzz.run_nbd --seconds $(FUZZ_SECONDS)
	$(PYTHON) -m fuzz.run_nbd --seconds $(FUZZ_SECONDS) --parallel
