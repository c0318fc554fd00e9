#!/bin/sh
# Joins the nodes named in the arguments (host:port ...) into a Redis Cluster with
# `redis-cli --cluster create`, one replica per master (REDIS_CLUSTER_REPLICAS), once: a
# cluster that is already up is left as it is. It runs as the ACL user `operator` of
# `vlpipe redis-acl --cluster`, its password in REDISCLI_AUTH. The compose profile
# `cluster` runs it (service redis-cluster); it exits 0 once every slot is served.
set -eu
cli() { redis-cli --user "${REDIS_CLUSTER_USER:-operator}" --no-auth-warning "$@"; }
state() { cli -h "${1%:*}" -p "${1##*:}" cluster info | tr -d '\r' | grep '^cluster_state:'; }

if [ "$(state "$1")" = "cluster_state:ok" ]; then
    echo "the cluster is up"
    exit 0
fi
addresses=""
for node in "$@"; do
    host=${node%:*}
    # CLUSTER MEET takes addresses; clients still get the names (cluster.conf).
    address=$(getent hosts "$host" | awk '{ print $1; exit }') || true
    addresses="$addresses ${address:-$host}:${node##*:}"
done
# shellcheck disable=SC2086 # one argument per node
cli --cluster create $addresses --cluster-replicas "${REDIS_CLUSTER_REPLICAS:-1}" --cluster-yes
until [ "$(state "$1")" = "cluster_state:ok" ]; do sleep 1; done
echo "the cluster is up"
