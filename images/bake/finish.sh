. /run/lbbake/common.sh
say STEP "removing per-machine identity"
cloud-init clean --logs || report "LOG cloud-init clean failed"
rm -f /etc/ssh/ssh_host_* /var/lib/dbus/machine-id /var/lib/rabbitmq/.erlang.cookie \
    /var/lib/systemd/random-seed /var/lib/systemd/credential.secret /var/lib/dhcp/*.leases
rm -f /etc/systemd/network/10-cloud-init-*.network /etc/netplan/50-cloud-init.yaml \
    /etc/network/interfaces.d/50-cloud-init /etc/network/interfaces.d/50-cloud-init.cfg
: > /etc/machine-id
echo localhost > /etc/hostname
apt-get clean
rm -rf /var/lib/apt/lists/*
journalctl --relinquish-var 2>/dev/null  # journald lets go of /var/log/journal's files
find /var/log/journal -mindepth 1 -delete 2>/dev/null
for path in /etc/ssh/ssh_host_* /var/lib/dbus/machine-id /var/lib/rabbitmq/.erlang.cookie \
        /var/lib/cloud/instance /var/lib/cloud/instances/* /var/log/cloud-init.log; do
    [ -e "$path" ] && report "LEFT $path"
done
[ -s /etc/machine-id ] && report "LEFT /etc/machine-id"
report "HOSTNAME $(cat /etc/hostname)"
# Freed blocks can be discarded only once the file system has committed their release.
sync
report "LOG $(fstrim -av 2>&1 | tr '
' ' ')"
sync
say DONE
systemctl --no-block poweroff
