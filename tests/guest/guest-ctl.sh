# Prepended to every guest script by lib.sh's guest(): the channel to the host on /dev/ttyS1 (a
# QEMU pipe chardev, see ctl_start in lib.sh). `say WORD` sends a line; `await WORD` waits for one.
ctl_tty() { [ -n "${ctl_ready:-}" ] || { stty -F /dev/ttyS1 raw -echo; ctl_ready=1; }; }
say() { ctl_tty; echo "$1" > /dev/ttyS1; }
await() { ctl_tty; while read -r line < /dev/ttyS1; do [ "${line%$(printf '\r')}" = "$1" ] && return 0; done; return 1; }
