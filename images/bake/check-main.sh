. /run/lbbake/common.sh
trap 'systemctl daemon-reload; systemctl start --no-block lbbake-finish.service || poweroff' EXIT
say BEGIN
sh /run/lbbake/check.sh 2>&1 | while IFS= read -r line; do report "OUT $line"; done
say INSTALLED
