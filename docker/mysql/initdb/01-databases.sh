#!/bin/bash
# Run once by the official mysql image on an empty data directory (/docker-entrypoint-initdb.d).
# MYSQL_DATABASE (dandelion) and MYSQL_USER already exist at this point; this adds the MLflow
# database and gives the same application user full rights on both.
set -euo pipefail

: "${MYSQL_ROOT_PASSWORD:?}" "${MYSQL_USER:?}"

MYSQL_PWD="${MYSQL_ROOT_PASSWORD}" mysql --protocol=socket -uroot <<SQL
CREATE DATABASE IF NOT EXISTS \`dandelion\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE DATABASE IF NOT EXISTS \`mlflow\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
GRANT ALL PRIVILEGES ON \`dandelion\`.* TO '${MYSQL_USER}'@'%';
GRANT ALL PRIVILEGES ON \`mlflow\`.* TO '${MYSQL_USER}'@'%';
FLUSH PRIVILEGES;
SQL
