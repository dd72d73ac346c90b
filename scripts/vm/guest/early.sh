#!/bin/bash
# Runs in the VM before systemd (from /usr/local/sbin/rmvm-init). On the
# first boot it installs the run's .deb and writes the machines and units the
# checks use, so that the first boot already is an ordinary boot of a host
# where rmachines was installed earlier: nothing is started by hand.
set -u
share=/mnt/rmvm
boot=$(cat "$share/boot")
exec >>"$share/results/early-$boot.log" 2>&1
echo "early.sh: boot $boot, $(date -u)"
[ "$boot" = 1 ] || exit 0
set -x

# No systemd is running yet: the maintainer scripts enable rmachined.service
# and skip starting it; systemd starts it at boot.
DEBIAN_FRONTEND=noninteractive dpkg -i "$share/rmachines.deb"
echo $? >"$share/results/dpkg-status"

# Nested machines. The busybox and Debian trees are in the image; small
# copies of the busybox tree for the machines that only need to exist.
for name in ord-a ord-b pk broken res; do
	cp -a /var/lib/machines/busybox "/var/lib/machines/$name"
done
mkdir -p /etc/rmachines
cat >/etc/rmachines/bb.toml <<'DEF'
root = "/var/lib/machines/busybox"
autostart = true
stop_timeout = "30s"
DEF
cat >/etc/rmachines/debian.toml <<'DEF'
root = "/var/lib/machines/debian"
autostart = true
stop_timeout = "60s"
DEF
for name in ord-a ord-b pk; do
	printf 'root = "/var/lib/machines/%s"\n[network]\nmode = "none"\n' "$name" >"/etc/rmachines/$name.toml"
done
# For the resources check (checks/pending/85-resources.sh).
cat >/etc/rmachines/res.toml <<'DEF'
root = "/var/lib/machines/res"
[network]
mode = "none"
[resources]
memory = "64M"
tasks = 64
cpus = 0.5
DEF
# Fails in the machine's child, after its root is mounted: a directory bound
# onto a file.
cat >/etc/rmachines/broken.toml <<'DEF'
root = "/var/lib/machines/broken"
[network]
mode = "none"
[[bind]]
source = "/srv"
target = "/etc/inittab"
DEF

# Ordering: rmachine@ord-b.service after rmachine@ord-a.service, both
# enabled at boot; ord-a is slow to start, so parallel starts would show.
mkdir -p /etc/systemd/system/rmachine@ord-a.service.d /etc/systemd/system/rmachine@ord-b.service.d
printf '[Service]\nExecStartPre=/bin/sleep 3\n' >/etc/systemd/system/rmachine@ord-a.service.d/slow.conf
printf '[Unit]\nAfter=rmachine@ord-a.service\nRequires=rmachine@ord-a.service\n' \
	>/etc/systemd/system/rmachine@ord-b.service.d/order.conf
for name in ord-a ord-b; do
	ln -sf /lib/systemd/system/rmachine@.service \
		"/etc/systemd/system/multi-user.target.wants/rmachine@$name.service"
done

# polkit: alice is in the group of the shipped example rule, bob is not.
groupadd --system rmachines
useradd --create-home --groups rmachines alice
useradd --create-home bob
cp /usr/share/doc/rmachines/examples/50-rmachines-group.rules.example \
	/etc/polkit-1/rules.d/50-rmachines.rules

# At shutdown, after rmachined has stopped (units stop in reverse order),
# keep the machines' logs from /run for the next boot's checks.
cat >/etc/systemd/system/rmvm-shutdown-evidence.service <<'UNIT'
[Unit]
Description=rmachines VM test bed: keep the machines' logs at shutdown
Before=rmachined.service
RequiresMountsFor=/var/log

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/bin/sh -c 'd=/var/log/rmvm/shutdown-$(tr -d - </proc/sys/kernel/random/boot_id); mkdir -p $d; cp -r /run/rmachines/machines $d/; date +%%s.%%N >$d/rmachined-stopped-at'

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/rmvm-shutdown-evidence.service \
	/etc/systemd/system/multi-user.target.wants/rmvm-shutdown-evidence.service
sync
