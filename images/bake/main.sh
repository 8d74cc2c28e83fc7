. /run/lbbake/common.sh
trap 'systemctl daemon-reload; systemctl start --no-block lbbake-finish.service || poweroff' EXIT
say BEGIN
. /etc/os-release 2>/dev/null && report "OS $PRETTY_NAME"
report "ARCH $(dpkg --print-architecture)"
if ! command -v systemctl >/dev/null 2>&1; then
    say "FAIL the guest has no systemd (systemctl), which a bake needs"
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [ -n "$units" ]; then
    say STEP "systemctl mask $units"
    systemctl mask $units || { say "FAIL systemctl mask $units failed"; exit 1; }
fi
if [ -n "$packages" ]; then
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy=created
    fi
    say STEP "apt-get update"
    if ! run_apt update; then
        report_apt_errors
        say "FAIL apt-get update failed"
        exit 1
    fi
    say STEP "apt-get install $packages"
    if ! run_apt install $packages; then
        report_apt_errors
        missing=""
        for package in $packages; do
            apt-cache show --no-all-versions "$package" > /dev/null 2>&1 \
                || missing="$missing $package"
        done
        if [ -n "$missing" ]; then
            say "FAIL packages not in the guest's archive:$missing"
        else
            say "FAIL apt-get install $packages failed"
        fi
        exit 1
    fi
    [ "${policy:-}" = created ] && rm -f /usr/sbin/policy-rc.d
fi
dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' |
    while read -r status package version; do
        case "$status" in ?i) report "PKG $package $version" ;; esac
    done
for unit in $units; do
    report "MASKED $unit $(systemctl is-enabled "$unit" 2>/dev/null)"
done
say INSTALLED
