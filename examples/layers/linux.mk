# Layered overlays with make for Linux guests under QEMU: a Debian base
# (scripts/linux-base.sh), an OS layer (package updates and a few tools) and
# an application layer (AbiWord, started and waiting) on top of it.
#
#   make -f examples/layers/linux.mk        # as root, in an empty directory
#
# Needs what scripts/linux-base.sh needs (qemu-system-x86, debootstrap,
# busybox-static, qemu-guest-agent, cpio) and the network (the layers run
# apt-get with --net user). Under TCG expect minutes per layer; CI runs the
# microVM's Makefile beside this one instead.
#
# Outputs: overlay.key, linux-base/, os.ovl, app.ovl, app-vm/ and the
# depfiles os.ovl.d, app.ovl.d. Linux guests keep clocks, logs and apt
# caches in memory and on disk, so a rebuilt layer has other bytes even
# when its scripts did not change.

# GNU make 4.3 or later (grouped targets, `&:`).
KIMBERLIZE ?= kimberlize
DEKIMBERLIZE ?= dekimberlize
# This file's directory, taken now: the -include at the end adds the
# depfiles to MAKEFILE_LIST.
HERE := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
SCRIPTS ?= $(HERE)
LINUX_BASE ?= $(SCRIPTS)/../../scripts/linux-base.sh
KEY ?= overlay.key
MEMORY ?= 1G

BUILD = $(KIMBERLIZE) build -q --progress none --net user -k $(KEY) --force

.PHONY: all clean
all: app.ovl app-vm/manifest.json

$(KEY):
	$(KIMBERLIZE) keygen -o $@

linux-base/manifest.json:
	KIMBERLIZE=$(KIMBERLIZE) $(LINUX_BASE) -o linux-base --memory $(MEMORY)

os.ovl: linux-base/manifest.json $(SCRIPTS)/linux-os-install.sh $(SCRIPTS)/linux-os-resume.sh | $(KEY)
	$(BUILD) --base linux-base --install $(SCRIPTS)/linux-os-install.sh \
	    --resume $(SCRIPTS)/linux-os-resume.sh -o $@ --depfile $@.d

app.ovl app-vm/manifest.json &: linux-base/manifest.json os.ovl \
    $(SCRIPTS)/linux-app-install.sh $(SCRIPTS)/linux-app-resume.sh | $(KEY)
	$(BUILD) --base linux-base --parent os.ovl \
	    --install $(SCRIPTS)/linux-app-install.sh \
	    --resume $(SCRIPTS)/linux-app-resume.sh \
	    -o app.ovl --launch-out app-vm --depfile app.ovl.d

-include os.ovl.d app.ovl.d

clean:
	rm -rf linux-base app-vm os.ovl app.ovl os.ovl.d app.ovl.d
