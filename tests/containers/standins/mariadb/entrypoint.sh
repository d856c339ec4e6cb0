#!/bin/bash
# The official mysql image's contract, on MariaDB: on an empty data directory, initialise it, set the root
# password, create MYSQL_DATABASE and MYSQL_USER, run /docker-entrypoint-initdb.d/* against a server that
# listens on its socket only; then run the real server (`mysqld ARGS...` runs mariadbd with ARGS).
# The client tools read the server's --port (the stack runs on the host's network, beside other servers).
set -euo pipefail
if [[ ${1:-} == mysqld || ${1:-} == mariadbd ]]; then
  shift
  for arg in "$@"; do
    [[ $arg == --port=* ]] && printf '[client]\nport=%s\n' "${arg#--port=}" >/etc/mysql/conf.d/zz-client-port.cnf
  done
  if [[ ! -d /var/lib/mysql/mysql ]]; then
    : "${MYSQL_ROOT_PASSWORD:?}"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --auth-root-authentication-method=normal --skip-test-db >/dev/null
    mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock "$@" &
    pid=$!
    for _ in $(seq 60); do mariadb-admin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1 && break; sleep 1; done
    # As the mysql image: no anonymous accounts (''@localhost would shadow MYSQL_USER@'%' on 127.0.0.1).
    mariadb --protocol=socket -uroot <<SQL
DELETE FROM mysql.global_priv WHERE User = '';
ALTER USER 'root'@'localhost' IDENTIFIED BY '${MYSQL_ROOT_PASSWORD}';
CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY '${MYSQL_ROOT_PASSWORD}';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;
${MYSQL_DATABASE:+CREATE DATABASE IF NOT EXISTS \`${MYSQL_DATABASE}\`;}
${MYSQL_USER:+CREATE USER IF NOT EXISTS '${MYSQL_USER}'@'%' IDENTIFIED BY '${MYSQL_PASSWORD}';}
${MYSQL_DATABASE:+${MYSQL_USER:+GRANT ALL PRIVILEGES ON \`${MYSQL_DATABASE}\`.* TO '${MYSQL_USER}'@'%';}}
FLUSH PRIVILEGES;
SQL
    for script in /docker-entrypoint-initdb.d/*; do
      case $script in
        *.sh) MYSQL_PWD=$MYSQL_ROOT_PASSWORD bash "$script" ;;
        *.sql) MYSQL_PWD=$MYSQL_ROOT_PASSWORD mariadb --protocol=socket -uroot <"$script" ;;
      esac
    done
    MYSQL_PWD=$MYSQL_ROOT_PASSWORD mariadb-admin --socket=/run/mysqld/mysqld.sock -uroot shutdown
    wait "$pid"
  fi
  exec mariadbd --user=mysql "$@"
fi
exec "$@"
