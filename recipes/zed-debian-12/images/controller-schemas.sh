#!/bin/sh
# Build script of the controller's image (recipe.toml: [roles.controller] build_script). It runs
# once, natively, when the image is built, inside the image's tree (chrooted, in mmdebstrap's
# namespaces), after the role's packages are installed.
#
# It creates the services' databases in the image's MariaDB data directory and brings each
# schema to its head with the service's own tool, as the guide's db-sync steps do. Nothing here
# depends on a lab: no user, no password, no address (the lab's steps create the users and
# grants, and nova's cell mappings, which hold passwords). Under emulation the migrations take
# minutes (neutron's alone about two); here, seconds. In the lab, the guide's steps then run
# unchanged: CREATE DATABASE IF NOT EXISTS finds the database, and each db-sync finds its schema
# at head and has nothing to do.
#
# Each schema's state (the package version and the alembic revisions) is recorded in
# /var/lib/labbuilder/schemas/<database>, with the command that compares a database with its
# record, lb-schema-at-head: the lab's db-sync steps use it as their guard, so a schema found as
# the image made it is not synced again (under emulation neutron's sync takes a minute even at
# head: it loads every migration to find out).
#
# The server runs only for this script: no network (a socket in /run), the character set the
# guide's my.cnf sets (utf8, utf8_general_ci), no durability it would not need (it is shut down
# cleanly before the tree becomes a disk). The tools run as root with a configuration file of
# their own, so they read no configuration of the image and write no log file into it.
set -eu

run=/run/labbuilder-schemas
sock="$run/mysqld.sock"
mkdir -p "$run" /run/mysqld
chown mysql:mysql "$run" /run/mysqld

mariadbd --user=mysql --skip-networking --socket="$sock" --pid-file="$run/mysqld.pid" \
	--skip-log-bin --log-error="$run/mysqld.err" \
	--character-set-server=utf8 --collation-server=utf8_general_ci \
	--innodb-use-native-aio=0 --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 &
server=$!

stop_server() {
	mariadb-admin --socket="$sock" shutdown 2>/dev/null || kill "$server" 2>/dev/null || true
	wait "$server" || true
}
trap stop_server EXIT

records=/var/lib/labbuilder/schemas
mkdir -p "$records"
cat >/usr/local/sbin/lb-schema-at-head <<'HELPER'
#!/bin/sh
# lb-schema-at-head DATABASE PACKAGE [record]: exit 0 when DATABASE holds the alembic revisions
# recorded when the image was built, with PACKAGE at the version it had then; "record" records
# them. Written by labbuilder's image build (the recipe's images/controller-schemas.sh).
set -eu
record="/var/lib/labbuilder/schemas/$1"
current() {
	dpkg-query -W -f='${Version}\n' "$2"
	mysql ${LB_SCHEMA_SOCKET:+--socket="$LB_SCHEMA_SOCKET"} -N \
		-e "SELECT version_num FROM \`$1\`.alembic_version ORDER BY version_num"
}
if [ "${3:-}" = record ]; then
	current "$1" "$2" >"$record"
	exit 0
fi
[ -f "$record" ] && [ "$(current "$1" "$2")" = "$(cat "$record")" ]
HELPER
chmod 0755 /usr/local/sbin/lb-schema-at-head

recorded() { # record database $1 of package $2 as it is now
	LB_SCHEMA_SOCKET="$sock" /usr/local/sbin/lb-schema-at-head "$1" "$2" record
}

tries=0
until mariadb-admin --socket="$sock" ping >/dev/null 2>&1; do
	tries=$((tries + 1))
	if [ "$tries" -gt 120 ] || ! kill -0 "$server" 2>/dev/null; then
		echo "MariaDB did not start for the schemas:" >&2
		cat "$run/mysqld.err" >&2 || true
		exit 1
	fi
	sleep 1
done

url() { # the SQLAlchemy URL of database $1 through the socket, as root (unix_socket auth)
	echo "mysql+pymysql://root@localhost/$1?unix_socket=$sock&charset=utf8"
}

database() {
	mariadb --socket="$sock" -e "CREATE DATABASE IF NOT EXISTS $1"
}

conf() { # write $run/$1.conf from standard input
	cat >"$run/$1.conf"
}

echo "schemas: keystone"
database keystone
conf keystone <<CONF
[database]
connection = $(url keystone)
CONF
keystone-manage --config-file "$run/keystone.conf" db_sync
recorded keystone python3-keystone

echo "schemas: glance"
database glance
conf glance <<CONF
[database]
connection = $(url glance)
CONF
glance-manage --config-file "$run/glance.conf" db_sync
recorded glance python3-glance

echo "schemas: placement"
database placement
conf placement <<CONF
[placement_database]
connection = $(url placement)
CONF
placement-manage --config-file "$run/placement.conf" db sync
recorded placement python3-placement

echo "schemas: nova_api, nova, nova_cell0"
database nova_api
database nova
database nova_cell0
for db in nova nova_cell0; do
	conf "$db" <<CONF
[api_database]
connection = $(url nova_api)
[database]
connection = $(url "$db")
CONF
done
nova-manage --config-file "$run/nova.conf" api_db sync
# --local_cell: this cell's database only (no cell mapping exists yet; the lab makes them)
nova-manage --config-file "$run/nova.conf" db sync --local_cell
nova-manage --config-file "$run/nova_cell0.conf" db sync --local_cell
for db in nova_api nova nova_cell0; do recorded "$db" python3-nova; done

echo "schemas: neutron"
database neutron
conf neutron <<CONF
[DEFAULT]
core_plugin = ml2
service_plugins = router
[database]
connection = $(url neutron)
CONF
neutron-db-manage --config-file "$run/neutron.conf" upgrade head
recorded neutron python3-neutron

trap - EXIT
stop_server
rm -rf "$run"
echo "schemas: done"
