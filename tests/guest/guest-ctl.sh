# Prepended to every guest script by lib.sh's guest(): the channel to the host on /dev/ttyS1 (a
# QEMU pipe chardev, see ctl_start in lib.sh). `say WORD` sends a line; `await WORD` waits for one.
# The port stays open on fd 5 from the first use: closing it shuts the UART down, and a reply
# arriving before the next open would be lost.
ctl_tty() { [ -n "${ctl_ready:-}" ] || { exec 5<>/dev/ttyS1; stty -F /dev/ttyS1 raw -echo; ctl_ready=1; }; }
say() { ctl_tty; echo "$1" >&5; }
await() { ctl_tty; while read -r line <&5; do [ "${line%$(printf '\r')}" = "$1" ] && return 0; done; return 1; }
