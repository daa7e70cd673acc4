#!/bin/bash
# Throwaway single-node Ceph (16.2, Debian bookworm) for the RBD tests: one monitor and one OSD on
# memstore, no mgr, no systemd; everything (conf, keyring, stores, logs, sockets, pid files) lives in
# one folder.  Recipe and measurements: shared/reference/ceph-rbd.md §1.
#
#   ceph-test-cluster.sh start DIR     # create + start; prints "ready" once the rbd pool takes writes
#   ceph-test-cluster.sh stop DIR      # stop the daemons (by their pid files only), keep DIR
#   ceph-test-cluster.sh destroy DIR   # stop, then remove DIR
#
# Environment:
#   CEPH_PORT=40000      monitor v2 port; v1 is CEPH_PORT+1; the OSD binds within CEPH_PORT+10..+99
#   CEPH_AUTH=none       "none" or "cephx" (DIR/keyring then holds client.admin's key)
#   CEPH_MEM_BYTES=1G    memstore capacity (the data sits in the OSD's memory)
#   CEPH_POOL=rbd        the pool created and initialised for rbd
set -euo pipefail

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop|destroy DIR" >&2; exit 2; }

port=${CEPH_PORT:-40000}
auth=${CEPH_AUTH:-none}
mem=${CEPH_MEM_BYTES:-1073741824}
pool=${CEPH_POOL:-rbd}

stop_daemons() {
    # OSD first (it reports its shutdown to the monitor), then the monitor; SIGKILL after 10 s
    local d=$1 name pid n
    for name in osd.0 mon.a; do
        [ -f "$d/run/$name.pid" ] || continue
        pid=$(cat "$d/run/$name.pid")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for n in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$d/run/$name.pid"
    done
}

case "$cmd" in
stop)    stop_daemons "$dir"; exit 0 ;;
destroy) stop_daemons "$dir"; rm -rf "$dir"; exit 0 ;;
start)   ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac

for tool in ceph-mon ceph-osd ceph monmaptool ceph-authtool rbd; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed (make system-deps installs ceph-mon ceph-osd ceph-common)" >&2; exit 1; }
done
[ ! -e "$dir/ceph.conf" ] || { echo "$dir already holds a cluster; destroy it first" >&2; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir"/{mon.a,osd.0,run,log}
fsid=$(cat /proc/sys/kernel/random/uuid)
osd_uuid=$(cat /proc/sys/kernel/random/uuid)
mode=none
[ "$auth" = cephx ] && mode=cephx

cat > "$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]
public addr = 127.0.0.1
auth cluster required = $mode
auth service required = $mode
auth client required = $mode
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.\$pid.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
crash dir = $dir/crash
ms bind port min = $((port + 10))
ms bind port max = $((port + 99))
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
auth allow insecure global id reclaim = false
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon mgr mkfs grace = 31536000
# a client that cannot reach the monitor gives up after 10 s instead of 300 s
client mount timeout = 10
[mon]
mon data = $dir/\$name
[osd]
osd data = $dir/\$name
keyring = $dir/\$name/keyring
osd objectstore = memstore
memstore device bytes = $mem
osd memory target = 268435456
CONF

ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$dir/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
monmaptool --create --fsid "$fsid" \
    --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" "$dir/monmap" >/dev/null

trap 'echo "start failed; logs in $dir/log" >&2; stop_daemons "$dir"' ERR
ceph-mon -c "$dir/ceph.conf" -i a --mkfs --monmap "$dir/monmap" --keyring "$dir/keyring"
ceph-mon -c "$dir/ceph.conf" -i a          # daemonises; pid in run/mon.a.pid

export CEPH_CONF="$dir/ceph.conf"
t() { timeout 60 "$@"; }
if [ "$mode" = cephx ]; then
    osd_key=$(ceph-authtool --gen-print-key)
    echo "{\"cephx_secret\": \"$osd_key\"}" > "$dir/osd.0/new.json"
    t ceph osd new "$osd_uuid" -i "$dir/osd.0/new.json" >/dev/null
    ceph-authtool --create-keyring "$dir/osd.0/keyring" -n osd.0 --add-key "$osd_key" >/dev/null
else
    t ceph osd new "$osd_uuid" >/dev/null
fi
ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd.0.mkfs.out" 2>&1 \
    || { cat "$dir/log/osd.0.mkfs.out" >&2; false; }
ceph-osd -c "$dir/ceph.conf" -i 0 2>>"$dir/log/osd.0.stderr"   # daemonises; pid in run/osd.0.pid

t ceph osd pool create "$pool" 8 8 >/dev/null 2>&1
# rbd pool init writes to the pool: it returns once the OSD is up and the PGs are active
t rbd pool init "$pool"
echo ready
