. /run/lbbake/common.sh
say DONE
systemctl --no-block poweroff
