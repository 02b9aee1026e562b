#!/usr/bin/env bash
# Local single-node SLURM cluster (with accounting) for tests and demos:
#   slurm/cluster.sh up|down|status        (root, Debian; what `make slurm-up` / `make slurm-down` call)
# `up` installs the Debian packages if missing, writes /etc/slurm/{slurm,slurmdbd}.conf, starts munged,
# MariaDB, slurmdbd, slurmctld and slurmd by hand (no systemd), registers cluster/account/user in
# accounting and waits until the node is idle. Idempotent: running daemons are left alone unless
# their configuration changed. `down` stops them by PID (SIGTERM, SIGKILL after 10 s).
set -euo pipefail

CLUSTER=${PTGRM_SLURM_CLUSTER:-ptgrm}
ACCOUNT=${PTGRM_SLURM_ACCOUNT:-ptgrm}
HOST=$(hostname -s)
ETC=/etc/slurm
RUN=/run/slurm
LOG=/var/log/slurm
SPOOL=/var/lib/slurm
PACKAGES="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
MUNGE_PID=/run/munge/munged.pid
MARIADB_PID=/run/mysqld/mysqld.pid

say() { echo "cluster.sh: $*"; }

# ---- processes ----------------------------------------------------------------------------------
alive() {  # alive PIDFILE: the process named in PIDFILE exists and is not a zombie
    local pid state
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, then SIGKILL after 10 s
    local name=$1 file=$2 pid i
    if ! alive "$file"; then say "$name not running"; return 0; fi
    pid=$(<"$file")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "$file" || break; sleep 0.1; done
    if alive "$file"; then say "$name ($pid) ignored SIGTERM; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do alive "$file" || break; sleep 0.1; done
    fi
    alive "$file" && { say "$name ($pid) still alive"; return 1; }
    say "$name stopped"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 5; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    say "timed out after ${secs}s waiting for $what"; return 1
}

# ---- installation and configuration -------------------------------------------------------------
install_packages() {
    local missing=""
    for b in slurmctld slurmd sinfo slurmdbd munged mariadbd; do command -v "$b" >/dev/null || missing=1; done
    [[ -z $missing ]] && return 0
    command -v apt-get >/dev/null || { say "SLURM is not installed and apt-get is missing"; return 1; }
    say "installing $PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}

write_if_changed() {  # write_if_changed FILE MODE OWNER < content; returns 0 when the file changed
    local tmp; tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
    install -m "$2" -o "$3" -g "$3" "$tmp" "$1"; rm -f "$tmp"; return 0
}

db_password() {  # the one in slurmdbd.conf, else a new random one
    local old
    old=$(sed -n 's/^StoragePass=//p' "$ETC/slurmdbd.conf" 2>/dev/null || true)
    [[ -n $old ]] && echo "$old" || head -c 18 /dev/urandom | base64 | tr -d '/+='
}

slurm_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat <<EOF
# Written by slurm/cluster.sh: a single-node cluster on this machine, for tests and demos.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
# a requeued job may start again after cred_expire + 1 s (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerParameters=kill_invalid_depend
KillWait=5
MailProg=/bin/true
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

slurmdbd_conf() {
    cat <<EOF
# Written by slurm/cluster.sh: accounting for the local cluster, in MariaDB on this machine.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$1
StorageLoc=slurm_acct_db
EOF
}

configure() {  # sets CHANGED=1 when a SLURM configuration file changed
    local pass
    install -d -o slurm -g slurm "$RUN" "$LOG" "$SPOOL" "$SPOOL/slurmctld" "$SPOOL/slurmd"
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -f /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    pass=$(db_password)
    CHANGED=0
    slurm_conf | write_if_changed "$ETC/slurm.conf" 644 root && CHANGED=1 || true
    slurmdbd_conf "$pass" | write_if_changed "$ETC/slurmdbd.conf" 600 slurm && CHANGED=1 || true
    DB_PASS=$pass
}

# ---- start --------------------------------------------------------------------------------------
start_munge() {
    alive $MUNGE_PID && return 0
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged bash -c 'munge -n | unmunge'
}

start_mariadb() {
    if ! alive $MARIADB_PID; then
        [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
        /etc/init.d/mariadb start >/dev/null
    fi
    wait_for 30 mariadb mariadb -e "select 1"
    mariadb <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurmdbd() {
    alive $RUN/slurmdbd.pid || /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
}

register() {  # cluster, account and root in accounting (before slurmctld registers itself)
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" ||
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="PTG-RM local" organization=ptgrm >/dev/null
    sacctmgr -n -P list assoc user=root account="$ACCOUNT" format=user | grep -qx root ||
        sacctmgr -i add user root account="$ACCOUNT" >/dev/null
}

node_idle() { sinfo -h -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated|completing)$'; }

up() {
    [[ $(id -u) == 0 ]] || { say "must run as root"; return 1; }
    install_packages
    configure
    if [[ $CHANGED == 1 ]] && { alive $RUN/slurmctld.pid || alive $RUN/slurmd.pid || alive $RUN/slurmdbd.pid; }; then
        say "configuration changed: restarting SLURM daemons"
        stop_pid slurmd $RUN/slurmd.pid; stop_pid slurmctld $RUN/slurmctld.pid; stop_pid slurmdbd $RUN/slurmdbd.pid
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    register
    alive $RUN/slurmctld.pid || /usr/sbin/slurmctld
    wait_for 30 slurmctld scontrol ping
    alive $RUN/slurmd.pid || /usr/sbin/slurmd
    if ! wait_for 60 "node $HOST idle" node_idle; then
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        wait_for 30 "node $HOST idle" node_idle || { sinfo; tail -5 "$LOG/slurmd.log"; return 1; }
    fi
    say "up: cluster $CLUSTER, partition debug, node $HOST ($(nproc) CPUs), account $ACCOUNT"
}

down() {
    stop_pid slurmd $RUN/slurmd.pid
    stop_pid slurmctld $RUN/slurmctld.pid
    stop_pid slurmdbd $RUN/slurmdbd.pid
    stop_pid mariadb $MARIADB_PID
    stop_pid munged $MUNGE_PID
}

status() {
    local rc=0 name file
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        case $name in munged) file=$MUNGE_PID ;; mariadb) file=$MARIADB_PID ;; *) file=$RUN/$name.pid ;; esac
        if alive "$file"; then echo "$name: running (pid $(<"$file"))"; else echo "$name: stopped"; rc=1; fi
    done
    [[ $rc == 0 ]] && sinfo
    return $rc
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
