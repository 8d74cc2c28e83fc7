# labbuilder bake: report lines go to the second serial port, which only the bake writes to.
LBBAKE_REPORT=/dev/ttyS1
( : > "$LBBAKE_REPORT" ) 2>/dev/null || LBBAKE_REPORT=/dev/console
report() { printf 'LBBAKE %s\n' "$*" > "$LBBAKE_REPORT"; }
say() { report "$@"; printf 'lbbake: %s\n' "$*"; }
# Runs apt-get with its output on the console as it comes (a sign of life for the host) and
# in /run/lbbake/apt.log; returns apt-get's exit code.
run_apt() {
    {
        apt-get -q -y -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0 "$@"
        echo $? > /run/lbbake/rc
    } 2>&1 | tee /run/lbbake/apt.log
    return "$(cat /run/lbbake/rc)"
}
report_apt_errors() {
    grep -E '^(E|Err):' /run/lbbake/apt.log | tail -n 5 | while IFS= read -r line; do
        report "LOG $line"
    done
}
