#!/usr/bin/env bash
# vsnap under real libvirt (Debian 12: libvirt 9.0, QEMU 7.2 TCG): transient domains with direct
# kernel boot whose virtio-fs daemon libvirt starts itself as vsnap-virtiofsd, in five variants
# (plain; cache=always + xattr + thread pool; <lock>; <sandbox mode='chroot'>; no <binary>, so
# libvirt picks vsnap-virtiofsd through the vhost-user descriptor `make install` put in place),
# each with a <disk type='vhostuser'> served by vsnap blk with <reconnect>. The guest
# (tests/guest/libvirt-guest.sh) mounts, writes, reads back and checks what the variant turns on;
# the host checks the command line libvirt ran, the daemon's process (binary, sandbox, pool), the
# files in the share and, at the end, every variant's pattern on the disk. See docs/libvirt.md.
# Starts virtlogd and libvirtd when none runs (and stops them), and sets /etc/libvirt/qemu.conf
# up for QEMU as root without a security driver (idempotent; left in place).
#   KEEP=1 keeps the work dir and the domains' libvirt logs.
source "$(dirname "$0")/lib.sh"
prepare
(cd "$repo" && cargo build -q --bins)
virtiofsd_bin="$repo/target/debug/vsnap-virtiofsd"
export LIBVIRT_DEFAULT_URI=qemu:///system
t_start=$(date +%s)
start_work
dom= dir= share= errors= dumped=
doms=() started_daemons=() masked=() backed_up=() made_dirs=()
vu_etc=/etc/qemu/vhost-user
trap lv_cleanup EXIT

# running PID: alive and not a zombie (a daemonized process whose reaper, PID 1, may not reap).
running() { local s; s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) && [ "${s%% *}" != Z ]; }
lv_cleanup() {
  local rc=$? d p f
  # An unexpected exit (set -e) still shows what the domain and the daemons said.
  [ "$rc" = 0 ] || [ -n "$dumped" ] || [ -z "$dom" ] || dump_logs
  for d in "${doms[@]}"; do virsh domid "$d" >/dev/null 2>&1 && virsh destroy "$d" >/dev/null 2>&1; done
  stop_daemon
  # The descriptor set-up: our files out, the masked and backed-up ones back.
  for f in "${masked[@]}"; do rm -f "$vu_etc/$f"; done
  rm -f "$vu_etc/50-vsnap-fs.json"
  for f in "${backed_up[@]}"; do mv -f "$work/vhost-user-backup/$f" "$vu_etc/$f"; done
  for ((p = ${#made_dirs[@]} - 1; p >= 0; p--)); do rmdir "${made_dirs[p]}" 2>/dev/null || true; done
  for p in "${started_daemons[@]}"; do
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 100); do running "$p" || break; sleep 0.1; done
  done
  if [ -z "${KEEP:-}" ]; then
    for d in "${doms[@]}"; do rm -f /var/log/libvirt/qemu/"$d".log /var/log/libvirt/qemu/"$d"-fs0-virtiofsd.log; done
  fi
  cleanup_work
}

# --- libvirt's daemons and qemu.conf ---------------------------------------------------------
qemu_conf=/etc/libvirt/qemu.conf
begin="# BEGIN vsnap tests/guest/libvirt.sh: QEMU as root, no security driver or cgroups"
end="# END vsnap tests/guest/libvirt.sh"
want_conf=$(printf '%s\n' "$begin" 'user = "root"' 'group = "root"' 'security_driver = "none"' \
  'dynamic_ownership = 0' 'cgroup_controllers = [ ]' "$end")
conf_changed=
if [ "$(sed -n "\|^$begin\$|,\|^$end\$|p" "$qemu_conf" 2>/dev/null)" != "$want_conf" ]; then
  # libvirt takes a key's first assignment: comment out the ones outside our block.
  touch "$qemu_conf"
  sed -i -e "\|^$begin\$|,\|^$end\$|d" \
    -e 's/^\([[:space:]]*\(user\|group\|security_driver\|dynamic_ownership\|cgroup_controllers\)[[:space:]]*=\)/#\1/' \
    "$qemu_conf"
  printf '%s\n' "$want_conf" >> "$qemu_conf"
  conf_changed=1
fi
pid_alive() { [ -f "$1" ] && running "$(cat "$1")"; }
if virsh version >/dev/null 2>&1; then
  [ -z "$conf_changed" ] || fail "a libvirtd runs that has not read the settings just written to $qemu_conf: restart it"
  echo "libvirt: using the running libvirtd"
else
  if ! pid_alive /run/virtlogd.pid; then
    virtlogd -d
    for _ in $(seq 50); do pid_alive /run/virtlogd.pid && break; sleep 0.1; done
    started_daemons=("$(cat /run/virtlogd.pid)" "${started_daemons[@]}")
  fi
  libvirtd -d
  for _ in $(seq 100); do virsh version >/dev/null 2>&1 && break; sleep 0.1; done
  virsh version >/dev/null 2>&1 || { tail -n 20 /var/log/libvirt/libvirtd.log >&2; fail "libvirtd did not start"; }
  started_daemons=("$(cat /run/libvirtd.pid)" "${started_daemons[@]}")
  echo "libvirt: started virtlogd and libvirtd ($(virsh version | awk '/libvirt/ {print $NF; exit}'))"
fi

# --- vsnap blk, shared by every domain ------------------------------------------------------
blk_sock="$work/blk.sock"
blk_serial=vsnap-libvirt
n_blk=0
start_blk() {
  n_blk=$((n_blk + 1))
  RUST_LOG=info "$vsnap" blk --socket-path "$blk_sock" --size 64M --state-dir "$work/blk-state" \
    --serial "$blk_serial" > "$work/blk.$n_blk.log" 2>&1 &
  daemon=$!
  for _ in $(seq 200); do
    grep -q listening "$work/blk.$n_blk.log" 2>/dev/null && return 0
    kill -0 "$daemon" 2>/dev/null || { cat "$work/blk.$n_blk.log" >&2; fail "vsnap blk $n_blk exited"; }
    sleep 0.05
  done
  fail "vsnap blk $n_blk did not listen"
}
start_blk

# --- one domain -----------------------------------------------------------------------------
# domain_xml NAME DIR BINARY_XML: a TCG domain booting the test kernel with DIR/initrd, the share
# DIR/share,dir as tag vsnapfs, the vhost-user disk, the console in DIR/console.log and the
# say/await channel on the FIFOs DIR/ctl.{in,out}.
domain_xml() {
  cat <<EOF
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$guest/kernel/vmlinux</kernel>
    <initrd>$2/initrd</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet loglevel=3</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs' queue='1024'/>
      $3
      <source dir='$2/share,dir'/>
      <target dir='vsnapfs'/>
    </filesystem>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw'/>
      <source type='unix' path='$blk_sock'><reconnect enabled='yes' timeout='1'/></source>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$2/console.log'/><target port='0'/></serial>
    <serial type='pipe'><source path='$2/ctl'/><target port='1'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

lv_fail() { dump_logs; fail "$dom: $*"; }
dump_logs() {
  dumped=1
  echo "==== $dom: serial console" >&2; cat "$dir/console.log" >&2 2>/dev/null || true
  echo "==== $dom: libvirt's qemu log" >&2; cat /var/log/libvirt/qemu/"$dom".log >&2 2>/dev/null || true
  echo "==== $dom: the fs daemon's log" >&2; cat /var/log/libvirt/qemu/"$dom"-fs0-virtiofsd.log >&2 2>/dev/null || true
  echo "==== vsnap blk" >&2; tail -n 20 "$work/blk.$n_blk.log" >&2 || true
  echo "==== libvirtd.log" >&2; tail -n 15 /var/log/libvirt/libvirtd.log >&2 || true
}
err() { echo "$dom: $*" >&2; echo "$*" >> "$errors"; }

# inspect: the fs daemon libvirt started, while the guest has the share mounted.
inspect() {
  local id pidfiles pid server cmd opts
  id=$(virsh domid "$dom" || true)
  pidfiles=(/run/libvirt/qemu/"$id"-*-fs0-fs.pid)
  [ -f "${pidfiles[0]}" ] || { err "no fs daemon pid file (/run/libvirt/qemu/$id-*-fs0-fs.pid)"; return; }
  pid=$(cat "${pidfiles[0]}")
  echo "$pid" > "$dir/fs.pid"
  running "$pid" || { err "the fs daemon $pid is not running"; return; }
  # " (deleted)": a build replaced the file since libvirt started it.
  local exe; exe=$(readlink "/proc/$pid/exe" || true); exe=${exe% (deleted)}
  [ "$exe" = "$expect_bin" ] || err "the fs daemon runs $exe, not $expect_bin"
  cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" | sed 's/ $//')
  echo "$cmd" > "$dir/cmdline"
  opts=${cmd#"$expect_bin" --fd=}
  opts=$(sed -E 's/^[0-9]+ //' <<< "$opts")
  [ "$opts" = "$expect_opts" ] || err "libvirt ran '$cmd', want '$expect_bin --fd=N $expect_opts'"
  # libvirt logs the command line it ran into the domain's log.
  grep -A1 -F "Starting external device: virtiofsd" /var/log/libvirt/qemu/"$dom".log | tail -1 |
    grep -qxF "$cmd" || err "libvirt's log does not show '$cmd'"
  # In namespace mode the pid libvirt knows supervises; its child serves.
  server=$(awk '{print $1}' "/proc/$pid/task/$pid/children" 2>/dev/null || true)
  server=${server:-$pid}
  case $variant in
    chroot)
      [ "$(readlink "/proc/$server/root")" = "$share" ] ||
        err "sandbox=chroot: the daemon's root is $(readlink "/proc/$server/root"), not the share" ;;
    *)
      [ "$server" != "$pid" ] && [ "$(readlink "/proc/$server/ns/mnt")" != "$(readlink /proc/self/ns/mnt)" ] &&
        [ "$(readlink "/proc/$server/ns/pid")" != "$(readlink /proc/self/ns/pid)" ] ||
        err "the default sandbox: no server in its own mount and pid namespaces" ;;
  esac
  local pool
  pool=$(cat /proc/"$server"/task/*/comm 2>/dev/null | grep -c '^vsnap-fs-pool' || true)
  [ "$pool" = "$expect_pool" ] || err "$pool pool threads, want $expect_pool"
  echo "$dom: fs daemon $pid (server $server): $cmd; $pool pool threads" >&2
}

on_guest() {
  case $1 in
    MOUNTED) inspect; echo INSPECTED ;;
    CACHE-READ) printf host-v2 > "$share/cache-probe"; echo CHANGED ;;
    BLK-RESTART)
      kill -TERM "$daemon"; wait "$daemon" || err "vsnap blk exited with status $? after SIGTERM"
      daemon=
      start_blk
      # QEMU retries every second (<reconnect timeout='1'>).
      for _ in $(seq 50); do grep -q "frontend connected" "$work/blk.$n_blk.log" && break; sleep 0.1; done
      grep -q "frontend connected" "$work/blk.$n_blk.log" || err "QEMU did not reconnect to the restarted vsnap blk"
      echo "$dom: vsnap blk restarted under the guest; QEMU reconnected" >&2
      echo RESTARTED ;;
  esac
}

# ctl_domain: answer the guest on DIR/ctl.{in,out} until it says DONE or the domain is gone.
# The FIFOs are opened read-write so no open blocks on a QEMU that already exited.
ctl_domain() {
  local line= part deadline=$(($(date +%s) + 240))
  exec 3<>"$dir/ctl.out" 4<>"$dir/ctl.in"
  while :; do
    if IFS= read -r -t 1 part <&3; then
      line=${line}${part%$'\r'}
      [ "$line" = DONE ] && break
      on_guest "$line" >&4
      line=
    else
      line=${line}${part}   # a timed-out read keeps the part of a line it got
      virsh domid "$dom" >/dev/null 2>&1 || break
      [ "$(date +%s)" -lt "$deadline" ] || { exec 3<&- 4>&-; lv_fail "timed out"; }
    fi
  done
  exec 3<&- 4>&-
}

# run_variant NAME SLOT BINARY_XML EXPECT_BIN EXPECT_OPTS EXPECT_POOL [GUEST_ENV...]
run_variant() {
  variant=$1 slot=$2 binary_xml=$3 expect_bin=$4 expect_pool=$6
  dom="vsnap-lv-$variant-$$" dir="$work/$variant"
  share="$dir/share,dir"
  expect_opts="-o source=${share//,/,,}$5"
  shift 6
  local t0; t0=$(date +%s)
  mkdir -p "$share"
  errors="$dir/host-errors"; : > "$errors"
  echo "made on the host for $variant" > "$share/from-host.txt"
  printf host-v1 > "$share/cache-probe"
  mkfifo "$dir/ctl.in" "$dir/ctl.out"
  GUEST_ENV=("VARIANT=$variant" "TAG=vsnapfs" "BLK_SERIAL=$blk_serial" "BLK_MB=$slot" "$@")
  guest_initrd "$repo/tests/guest/libvirt-guest.sh" "$dir/initrd"
  domain_xml "$dom" "$dir" "$binary_xml" > "$dir/domain.xml"
  doms+=("$dom")
  virsh create "$dir/domain.xml" > /dev/null || lv_fail "virsh create failed"
  virsh dumpxml "$dom" > "$dir/live.xml"
  ctl_domain
  for _ in $(seq 300); do virsh domid "$dom" >/dev/null 2>&1 || break; sleep 0.1; done
  virsh domid "$dom" >/dev/null 2>&1 && lv_fail "the domain did not power off"
  grep -aq "VSNAP-GUEST-RESULT: 0" "$dir/console.log" || lv_fail "the guest script failed"
  [ -s "$errors" ] && lv_fail "host checks: $(tr '\n' ';' < "$errors")"
  # libvirt stopped the daemon with the domain.
  local pid; pid=$(cat "$dir/fs.pid")
  for _ in $(seq 50); do running "$pid" || break; sleep 0.1; done
  running "$pid" && lv_fail "the fs daemon $pid outlived the domain"
  # What the guest wrote is on the host.
  local log=/var/log/libvirt/qemu/$dom-fs0-virtiofsd.log
  [ "$(sha256sum < "$share/guest/data" | cut -d' ' -f1)" = "$(marker "$dir/console.log" FS-SHA256)" ] ||
    lv_fail "the host's guest/data differs from what the guest wrote"
  [ "$(cat "$share/guest/sub/note")" = "written by the guest in $variant" ] || lv_fail "guest/sub/note on the host"
  if [[ " $* " == *" XATTR=1 "* ]]; then
    [ "$(getfattr --absolute-names --only-values -n user.vsnap "$share/guest/sub/note")" = "$variant" ] ||
      lv_fail "the guest's xattr is not on the host"
  fi
  if [[ " $* " == *" LOCKS=1 "* ]]; then
    grep -q -- "-o flock: accepted" "$log" && grep -q -- "-o posix_lock: accepted" "$log" ||
      lv_fail "no warning for libvirt's flock/posix_lock in the daemon's log"
  fi
  [ -z "$(ls -A "$share/.vsnap-workdir" 2>/dev/null)" ] || lv_fail "links left in the workdir after unmount"
  ! grep -q " ERROR " "$log" || lv_fail "errors in the daemon's log"
  marker "$dir/console.log" BLK-SHA256 > "$dir/blk.sha256" || true
  [ -s "$dir/blk.sha256" ] || lv_fail "no BLK-SHA256 from the guest"
  { grep -a -E "^(xattr|flock|cache):" "$dir/console.log" || true; } | tr -d '\r' | sed "s/^/$variant: /"
  echo "libvirt: $variant passed in $(($(date +%s) - t0)) s: $(cat "$dir/cmdline")"
}

fs_binary() { echo "<binary path='$virtiofsd_bin'${1:-}>${2:-}</binary>"; }
run_variant plain 1 "$(fs_binary)" "$virtiofsd_bin" "" 0 RESTART_BLK=1
run_variant cache 2 "$(fs_binary " xattr='on'" "<cache mode='always'/><thread_pool size='4'/>")" \
  "$virtiofsd_bin" ",cache=always,xattr --thread-pool-size=4" 4 XATTR=1 CACHE_ALWAYS=1
run_variant lock 3 "$(fs_binary "" "<lock posix='on' flock='on'/>")" "$virtiofsd_bin" ",flock,posix_lock" 0 LOCKS=1
run_variant chroot 4 "$(fs_binary "" "<sandbox mode='chroot'/>")" "$virtiofsd_bin" ",sandbox=chroot" 0

# --- the binary found through the installed descriptor --------------------------------------
# libvirt (qemuInteropFetchConfigs, privileged daemon) reads /usr/share/qemu/vhost-user and
# /etc/qemu/vhost-user, a file in /etc replacing one of the same name, an empty file hiding it,
# and takes the first "fs" descriptor in file-name order. Debian's 50-qemu-virtiofsd.json sorts
# before 50-vsnap-fs.json, so every fs descriptor ahead of ours is hidden for this domain.
for d in /etc/qemu "$vu_etc"; do [ -d "$d" ] || { mkdir "$d"; made_dirs+=("$d"); }; done
mkdir -p "$work/vhost-user-backup"
if [ -e "$vu_etc/50-vsnap-fs.json" ]; then mv "$vu_etc/50-vsnap-fs.json" "$work/vhost-user-backup/"; backed_up+=(50-vsnap-fs.json); fi
is_fs() { [ -s "$1" ] && python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1])).get("type") != "fs")' "$1"; }
for f in $( (ls /usr/share/qemu/vhost-user; ls "$vu_etc"; echo 50-vsnap-fs.json) 2>/dev/null | LC_ALL=C sort -u); do
  [ "$f" != 50-vsnap-fs.json ] || break
  p=/usr/share/qemu/vhost-user/$f
  [ -e "$vu_etc/$f" ] && p=$vu_etc/$f
  is_fs "$p" || continue
  if [ -e "$vu_etc/$f" ]; then mv "$vu_etc/$f" "$work/vhost-user-backup/"; backed_up+=("$f"); fi
  : > "$vu_etc/$f"
  masked+=("$f")
done
# Staged with DESTDIR, so nothing else `make install` writes (other descriptors, unit files)
# reaches the system: the binaries go to $work/prefix, only our fs descriptor to $vu_etc.
stage="$work/stage"
make -s -C "$repo" install DESTDIR="$stage" PREFIX="$work/prefix" PROFILE=debug VHOST_USER_DIR="$vu_etc" \
  > "$work/install.log" 2>&1 || { cat "$work/install.log" >&2; fail "make install"; }
mv "$stage$work/prefix" "$work/prefix"
cp "$stage$vu_etc/50-vsnap-fs.json" "$vu_etc/"
[ ${#masked[@]} = 0 ] || echo "libvirt: hid ${masked[*]} in $vu_etc for the descriptor variant"
run_variant descriptor 5 "" "$work/prefix/bin/vsnap-virtiofsd" "" 0
grep -qF "<binary path='$work/prefix/bin/vsnap-virtiofsd'/>" "$work/descriptor/live.xml" ||
  fail "the live domain XML does not name the installed vsnap-virtiofsd"

# --- the disk -------------------------------------------------------------------------------
dom=vsnap-blk dir=$work
kill -TERM "$daemon"; wait "$daemon" || fail "vsnap blk exited with status $? after SIGTERM"
daemon=
"$vsnap" materialize --state-dir "$work/blk-state" --out "$work/disk.img"
slot=0
for v in plain cache lock chroot descriptor; do
  slot=$((slot + 1))
  got=$(dd if="$work/disk.img" bs=1M skip=$slot count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$(cat "$work/$v/blk.sha256")" ] || fail "the disk's slot $slot differs from what the $v domain wrote"
done
connections=$(cat "$work"/blk.*.log | grep -c "frontend connected" || true)
[ "$connections" = 6 ] || fail "vsnap blk saw $connections connections, want 6 (5 domains, 1 reconnect)"
echo "libvirt: the disk holds every domain's pattern (6 vhost-user connections, 1 reconnect)"
echo "libvirt guest test: 5 passed, 0 failed ($(($(date +%s) - t_start)) s)"
