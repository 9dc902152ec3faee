# vsnap — see README.md.
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=
# The cargo profile `make install` builds and installs (release, or debug for tests).
PROFILE ?= release
# Where QEMU and libvirt look for vhost-user backend descriptors (docs/interop/vhost-user.json).
VHOST_USER_DIR ?= /usr/share/qemu/vhost-user

.PHONY: all build deps demo test unit guest lint fmt bench economy clean install

all: build

build:
	$(CARGO) build --release --workspace

# Serve a blank disk to a guest, cut twice while it writes, export, summarise.
demo:
	demo/demo.sh

# System packages the tests need (QEMU, qemu-img, guest tools); root on Debian 12.
deps:
	tests/guest/deps.sh

# Everything CI runs: formatting, lints, unit/integration tests, install, real-guest tests.
test: deps lint unit guest
	tests/install.sh

# Where systemd looks for units a local install adds (docs/service.md).
SYSTEMD_UNIT_DIR ?= $(PREFIX)/lib/systemd/system

# vsnap, vsnap-virtiofsd and vsnap-blk into PREFIX/bin, the vhost-user descriptors naming the
# latter two, and the systemd unit templates (their ExecStart= pointed at PREFIX/bin).
install:
	$(CARGO) build --bins $(if $(filter release,$(PROFILE)),--release)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(VHOST_USER_DIR) $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	install -m 0755 target/$(PROFILE)/vsnap target/$(PROFILE)/vsnap-virtiofsd \
		target/$(PROFILE)/vsnap-blk $(DESTDIR)$(PREFIX)/bin/
	for d in fs blk; do \
		sed 's|@BINDIR@|$(PREFIX)/bin|' contrib/vhost-user/50-vsnap-$$d.json.in \
			> $(DESTDIR)$(VHOST_USER_DIR)/50-vsnap-$$d.json || exit 1; \
	done
	for u in contrib/systemd/*@.service contrib/systemd/*@.socket; do \
		sed 's|/usr/local/bin/|$(PREFIX)/bin/|' $$u > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$${u##*/} \
			&& chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$${u##*/} || exit 1; \
	done

unit:
	$(CARGO) test --workspace --all-targets

# Real guests (QEMU TCG + Debian kernel + initramfs) against vsnap's sockets.
guest:
	tests/guest/blk.sh
	tests/guest/snapshot.sh
	tests/guest/crash.sh
	tests/guest/fs.sh
	tests/guest/reconnect.sh
	KILL9=1 tests/guest/reconnect.sh
	WRITE_THROUGH=1 tests/guest/reconnect.sh
	tests/guest/libvirt.sh
	bench/economy.sh --check zero-file/default fill-delete/fstrim mixed/fstrim

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Block-layer micro benchmarks, then vsnap vs qemu-storage-daemon and vsnap fs vs virtiofsd
# through the project's own frontends, and the instructions vsnap fs spends per request.
bench:
	$(CARGO) bench -p vsnap-block --bench block
	bench/blk.sh
	bench/fs.sh
	bench/fs-instructions.sh

# Diff economy: every workload x ext4 knob in a real guest (docs/diff-economy.md), ~15 min.
economy:
	bench/economy.sh

clean:
	$(CARGO) clean
