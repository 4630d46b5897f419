# shadowtrace: record a guest under QEMU TCG, replay it through a model of
# Xen's shadow paging.
#
#   make demo    set up what is missing, capture the seed scenario, replay it
#   make test    set up what is missing, run the whole test suite
#   make xen     fetch the real Xen and build its dom0 (part of `make test`)
#   make plugin-test   build and run the plugin's C unit tests (part of `make test`)
#
# Everything is built under build/ (cached; `make clean` removes it).

# The guest kernel: one variable, every other name follows from it.
KVER      ?= 6.1.0-56-amd64
QEMU_SUITE = bookworm-backports
BUILD     := $(CURDIR)/build
VENV      := $(CURDIR)/.venv
PY        := $(VENV)/bin/python
ST        := $(VENV)/bin/shadowtrace
# every folder with a steps.sh; "_name" folders are build steps, not scenarios
SCENARIOS := $(notdir $(patsubst %/steps.sh,%,$(wildcard scenarios/*/steps.sh)))

GUEST     := $(BUILD)/guest
PLUGIN    := $(BUILD)/plugin/libshadowtrace.so
# the plugin's units: every .c and .h in plugin/ (its C tests are in plugin/tests/)
PLUGIN_SRC := $(wildcard plugin/*.c)
PLUGIN_HDR := $(wildcard plugin/*.h)
PLUGIN_TESTS := $(BUILD)/plugin/test_decode $(BUILD)/plugin/test_console $(BUILD)/plugin/test_tablerefs
QEMU_INC  := $(BUILD)/qemu-include
GEN       := $(BUILD)/gen
XEN       := $(BUILD)/xen

export SHADOWTRACE_BUILD := $(BUILD)

.PHONY: all setup system demo test lint bench-capture bench-replay clean guest plugin plugin-test python xen xen-fidelity
.DELETE_ON_ERROR:
.SECONDEXPANSION:

all: setup

setup: system python plugin guest

# -- Debian packages (QEMU 10 from backports, headers, busybox, ...) -------
system: $(BUILD)/.system-$(KVER)
$(BUILD)/.system-$(KVER): scripts/setup-system.sh
	@mkdir -p $(BUILD)
	bash scripts/setup-system.sh $(KVER)
	@touch $@

# -- qemu-plugin.h from the Debian source package of the installed QEMU ----
$(QEMU_INC)/qemu-plugin.h: $(BUILD)/.system-$(KVER)
	bash scripts/fetch-plugin-header.sh $(QEMU_SUITE) $(BUILD)/src $(QEMU_INC)

# -- the plugin -------------------------------------------------------------
plugin: $(PLUGIN)
$(GEN)/trace_format.h: replay/trace/format.py
	@mkdir -p $(GEN)
	python3 replay/trace/format.py --emit-c > $@
# one .so from all the units; only qemu_plugin_install/_version are exported
$(PLUGIN): $(PLUGIN_SRC) $(PLUGIN_HDR) $(GEN)/trace_format.h $(QEMU_INC)/qemu-plugin.h
	@mkdir -p $(dir $@)
	gcc -O2 -g -Wall -Wextra -fPIC -fvisibility=hidden -shared -o $@ $(PLUGIN_SRC) \
	    -I$(GEN) -I$(QEMU_INC) \
	    $$(pkg-config --cflags --libs glib-2.0) -lmsgpackc -lzstd -lpthread

# the decoder, the console encoder and the table-frame rule are pure:
# tested on byte strings and on a small fake RAM, under ASan/UBSan (a
# truncated buffer is copied to a block of its own size)
plugin-test: $(PLUGIN_TESTS)
	@for t in $^; do echo "$$t"; $$t || exit 1; done
$(BUILD)/plugin/test_decode: plugin/tests/test_decode.c plugin/decode.c plugin/decode.h
	@mkdir -p $(dir $@)
	gcc -O1 -g -Wall -Wextra -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -Iplugin -o $@ plugin/tests/test_decode.c plugin/decode.c
$(BUILD)/plugin/test_console: plugin/tests/test_console.c plugin/console.c plugin/console.h $(GEN)/trace_format.h
	@mkdir -p $(dir $@)
	gcc -O1 -g -Wall -Wextra -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -Iplugin -I$(GEN) -o $@ plugin/tests/test_console.c plugin/console.c
$(BUILD)/plugin/test_tablerefs: plugin/tests/test_tablerefs.c plugin/tablerefs.c plugin/tablerefs.h
	@mkdir -p $(dir $@)
	gcc -O1 -g -Wall -Wextra -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -Iplugin -o $@ plugin/tests/test_tablerefs.c plugin/tablerefs.c

# -- the guest: Debian kernel + one busybox initramfs per scenario ----------
guest: $(GUEST)/vmlinuz $(GUEST)/kallsyms $(GUEST)/kernel-offsets $(SCENARIOS:%=$(GUEST)/%.cpio.gz)
$(GUEST)/vmlinuz: $(BUILD)/.system-$(KVER)
	bash scripts/fetch-kernel.sh $(KVER) $(BUILD)/src $(GUEST)
# Debian's System.map is a stub: take the kernel's symbols from a guest boot.
$(GUEST)/kallsyms: $(GUEST)/vmlinuz $(GUEST)/_symbols.cpio.gz $(VENV)/.installed
	$(PY) -m qmp_tools.symbols $@
# Structure offsets the capture needs (mm_struct.pgd), from the kernel headers.
$(GUEST)/kernel-offsets: scripts/kernel-offsets.sh $(BUILD)/.system-$(KVER)
	@mkdir -p $(GUEST)
	bash scripts/kernel-offsets.sh $(KVER) $@
$(GUEST)/%.cpio.gz: scenarios/%/steps.sh $(wildcard scenarios/*/* scenarios/*/user/*) guest/init scripts/build-scenario.sh $(BUILD)/.system-$(KVER)
	@mkdir -p $(GUEST)
	bash scripts/build-scenario.sh $* $(KVER) $(BUILD)

# -- the real Xen (pinned Debian build with shadow paging) and its dom0 -----
xen: $(XEN)/.built
# A hypervisor built from source (scripts/build-xen-hypervisor.sh, when no
# package has shadow paging) takes the package's place.
$(XEN)/.built: scripts/setup-xen.sh guest/xen-dom0-init $(GUEST)/vmlinuz $(BUILD)/.system-$(KVER) \
               $(wildcard $(XEN)/local/xen)
	bash scripts/setup-xen.sh $(KVER) $(BUILD)
	@touch $@

# -- Python: a private venv with the package and its dependencies ----------
python: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# -- what a user runs -------------------------------------------------------
demo: setup
	@mkdir -p out
	$(ST) capture --scenario seed --deterministic --out out/seed.trace
	$(ST) replay out/seed.trace --watch-console \
	    --secure 'console:The address allocated is ([0-9a-f]+)'

# The suite on up to 4 workers (pytest-xdist): QEMU boots are one host CPU
# each, and tests of one costly fixture share a worker (tests/conftest.py,
# SHARED_WORKER), so each boot still happens once. TEST_JOBS=1 to run it in
# one worker; `pytest -m 'not e2e'` is the quick loop.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n > 4 ? 4 : n )))
test: setup lint plugin-test xen
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup --no-loadscope-reorder

lint: python
	$(VENV)/bin/ruff check replay qmp_tools tests
	$(VENV)/bin/mypy

# The model beside the real Xen (README, "Model vs real Xen"). The model side
# is a warm start: each scenario captured from boot (--window all) and
# without UNTRACK (Xen emulates every store into a still-shadowed freed
# table), counted inside the marker window only (docs/compare.md). Captures
# and Xen runs are kept in out/ and redone only when their inputs change.
# reserved-root and reserved-root-lazy are left out: their module refuses to
# load in a PVH guest (the memmap= range is not a reserved range of Xen's
# e820), so Xen has no window to compare.
# XEN_RUNS=N runs each scenario N times under Xen (out/xen/NAME, NAME.2 ...):
# Xen's counts vary from run to run, and the tables give their range.
XEN_SCENARIOS := seed vmalloc fork smp-fork private-root shared-l1 secretmem
XEN_RUNS  ?= 1
FIDELITY  := out/fidelity
XEN_MORE_RUNS = $(foreach s,$(XEN_SCENARIOS),$(foreach k,$(wordlist 2,$(XEN_RUNS),$(shell \
                  seq 1 $(XEN_RUNS))),out/xen/$(s).$(k)/.run-done))
xen-fidelity: $(foreach s,$(XEN_SCENARIOS),$(FIDELITY)/$(s).trace out/xen/$(s)/.done) \
              $(XEN_MORE_RUNS)
	$(PY) -m replay.xen.fidelity --traces $(FIDELITY) --runs $(XEN_RUNS) out/xen $(XEN_SCENARIOS)
$(FIDELITY)/%.trace: $(PLUGIN) scenarios/%/steps.sh $$(wildcard scenarios/%/*.c) | setup
	@mkdir -p $(FIDELITY)
	$(ST) capture --scenario $* --window all --no-untrack --deterministic --out $@
out/xen/%/.done: scenarios/%/steps.sh $$(wildcard scenarios/%/*.c) $(XEN)/.built | setup
	$(ST) xen --scenario $* --out out/xen/$*
	@touch $@
# Run k (2 and up) of a scenario: out/xen/NAME.k
out/xen/%/.run-done: scenarios/$$(basename $$*)/steps.sh \
                     $$(wildcard scenarios/$$(basename $$*)/*.c) $(XEN)/.built | setup
	$(ST) xen --scenario $(basename $*) --out out/xen/$*
	@touch $@

bench-capture: setup
	$(PY) -m qmp_tools.bench

bench-replay: python
	$(PY) -m replay.bench

clean:
	rm -rf $(BUILD) $(VENV) out
