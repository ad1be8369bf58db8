#!/usr/bin/env bash
# Broker logins for a fleet: from a list of node names, one random password per node and
# per collector login, the dynamic-security file that makes mosquitto accept them and the
# ACL file that lets them publish and read (config/mosquitto.conf; docs/deployment.md,
# "Broker logins").
#
#   scripts/broker-users.sh --cluster NAME [--collector USER]... [--admin USER [--add]]
#                           [--out DIR] NODES
#
# NODES      a file with one node name per line (blank lines skipped, and `#` comments at a
#            line's start or after a blank), or `-` for stdin; the agents' node names,
#            1-64 of A-Z a-z 0-9 . _ -
# --cluster  the agents' [agent] cluster: each node may log in only with its agent's
#            client id, nodewatt-agent-<cluster>-<node>, and publish only to
#            nodewatt/v1/<cluster>/<node>/...
# --collector a collector login (default: collector); repeat for more (give `collector`
#            too to keep that one). Not pinned to a client id: collectors sharing one
#            login keep their own ids and persistent sessions in one share group.
# --admin    also a login that may use the plugin's $CONTROL/dynamic-security topics on
#            the running broker and publish nothing else: it can change every login and
#            role there, so its password is as good as full control of the broker
# --add      the broker runs the previous file: also write add/node-<node>/mosquitto_rr
#            for each node that got a new password in this run, the options with which
#            mosquitto_rr (package mosquitto-clients) logs in as the --admin user and
#            creates that node, no restart (docs/deployment.md, "Broker logins"). One
#            stays until deleted, as the recipe there does once the broker accepted it, and
#            later runs with --add rewrite it with the current passwords; one for a node no
#            longer listed is deleted by every run.
# --out      output directory (default: broker-users), private to its owner:
#   passwords/<user>        the password alone: install on that node at the agent's
#                           [mqtt] password_file (root:nodewatt 0640)
#   dynamic-security.json   install on the broker as /etc/mosquitto/nodewatt-dynsec.json
#                           (root:mosquitto 0640), then restart mosquitto (only new
#                           nodes: or run add/*/mosquitto_rr, see --add)
#   nodewatt.acl            install on the broker as /etc/mosquitto/nodewatt.acl
#                           (root:mosquitto 0640), the same restart: this cluster's topics
#                           and every collector login (config/mosquitto.acl is an example)
#   add/node-<node>/mosquitto_rr  with --add, see there
# All files 0600 whatever the caller's umask, as most hold passwords: install the broker's
# two as said (mosquitto reads them after dropping to its user: a root-owned 0600 one stops it).
#
# An existing passwords/<user> is kept, so adding nodes changes no other password; delete
# it to rotate that one. A user left out of the list cannot log in once the new file is
# installed. Needs mosquitto_passwd (package mosquitto), which hashes from a private file:
# no password ever appears on a command line.
set -euo pipefail
umask 077
export LC_ALL=C

die() {
  echo "broker-users: $*" >&2
  exit 1
}
usage() {
  echo "usage: $0 --cluster NAME [--collector USER]... [--admin USER [--add]] [--out DIR] NODES" >&2
  exit 2
}

cluster='' out=broker-users list='' admin='' add=''
collectors=()
while [ $# -gt 0 ]; do
  case $1 in
    --cluster) [ $# -ge 2 ] || usage; cluster=$2; shift 2 ;;
    --collector) [ $# -ge 2 ] || usage; collectors+=("$2"); shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --admin) [ $# -ge 2 ] || usage; admin=$2; shift 2 ;;
    --add) add=1; shift ;;
    -h | --help) usage ;;
    -) [ -z "$list" ] || usage; list=-; shift ;;
    -*) die "unknown option $1" ;;
    *) [ -z "$list" ] || usage; list=$1; shift ;;
  esac
done
if [ -z "$cluster" ] || [ -z "$list" ]; then usage; fi
[ -z "$add" ] || [ -n "$admin" ] || die "--add needs --admin: the login that adds them"
[ ${#collectors[@]} -gt 0 ] || collectors=(collector)

# The agents' rule for names (nodewatt_wire::NodeName): also a safe MQTT topic level and
# file name, and nothing in it needs quoting in JSON.
# `.` and `..` would be directories, not files, under passwords/.
valid() { [[ $1 =~ ^[A-Za-z0-9._-]{1,64}$ && $1 != . && $1 != .. ]]; }
valid "$cluster" || die "cluster $cluster: must be 1-64 of A-Z a-z 0-9 . _ - (not . or ..)"
passwd_bin=$(command -v mosquitto_passwd || true)
[ -n "$passwd_bin" ] || passwd_bin=/usr/bin/mosquitto_passwd
[ -x "$passwd_bin" ] || die "mosquitto_passwd not found (apt install mosquitto)"

declare -A seen=()
nodes=()
n=0
while IFS= read -r line || [ -n "$line" ]; do
  n=$((n + 1))
  # A comment starts a line or follows a blank: `n#1` is a (bad) name, not `n`.
  line=${line%%[[:space:]]#*}
  [[ $line != \#* ]] || line=''
  line=${line#"${line%%[![:space:]]*}"}
  line=${line%"${line##*[![:space:]]}"}
  [ -n "$line" ] || continue
  valid "$line" || die "$list:$n: node $line: must be 1-64 of A-Z a-z 0-9 . _ - (not . or ..)"
  [ -z "${seen[$line]:-}" ] || die "$list:$n: node $line listed twice"
  seen[$line]=node
  nodes+=("$line")
done < <(if [ "$list" = - ]; then cat; else cat -- "$list"; fi)
[ ${#nodes[@]} -gt 0 ] || die "no node names in $list"
for c in "${collectors[@]}"; do
  valid "$c" || die "collector $c: must be 1-64 of A-Z a-z 0-9 . _ - (not . or ..)"
  # A node with a collector's name would log in as that collector.
  [ -z "${seen[$c]:-}" ] || die "collector $c is also listed as a node, or twice"
  seen[$c]=collector
done
if [ -n "$admin" ]; then
  valid "$admin" || die "admin $admin: must be 1-64 of A-Z a-z 0-9 . _ - (not . or ..)"
  [ -z "${seen[$admin]:-}" ] || die "admin $admin is also a node or collector login"
  seen[$admin]='admin'
fi

mkdir -p "$out/passwords"
chmod 700 "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 24 random bytes (192 bits: hashing iterations add nothing to that) per user, 32
# characters of base64url each, drawn at once: a fleet takes seconds.
users=("${nodes[@]}" "${collectors[@]}" ${admin:+"$admin"})
mapfile -t fresh < <(head -c $((24 * ${#users[@]})) /dev/urandom | base64 -w 32 | tr '+/' '-_')
# user:password lines for mosquitto_passwd -U, which splits at ':' and trims blanks.
created=0
declare -A pws=() new=()
for i in "${!users[@]}"; do
  user=${users[$i]}
  f=$out/passwords/$user
  if [ -e "$f" ]; then
    IFS= read -r pw <"$f" || true
    [[ -n $pw && $pw != *[![:graph:]]* && $pw != *:* ]] ||
      die "$f: not one line of printable ASCII without blanks or ':'"
  else
    pw=${fresh[$i]}
    [ ${#pw} -eq 32 ] || die "short read from /dev/urandom"
    printf '%s\n' "$pw" >"$f"
    created=$((created + 1))
    new[$user]=1
  fi
  pws[$user]=$pw
  printf '%s:%s\n' "$user" "$pw"
done >"$tmp/passwd"
"$passwd_bin" -U "$tmp/passwd"

# mosquitto_passwd writes PBKDF2-SHA512 as $7$<iterations>$<salt>$<hash>: the same
# scheme, salt and hash sizes as the plugin's own, so both fields carry over as they are.
declare -A hashed=()
while IFS= read -r line; do
  hashed[${line%%:*}]=${line#*:}
done <"$tmp/passwd"
client() {
  local user=$1 extra=$2 iter salt hash
  [[ ${hashed[$user]:-} == "\$7\$"* ]] || die "mosquitto_passwd did not hash $user"
  IFS='$' read -r _ _ iter salt hash <<<"${hashed[$user]}"
  printf '    {"username": "%s", %s"password": "%s", "salt": "%s", "iterations": %s}' \
    "$user" "$extra" "$hash" "$salt" "$iter"
}
{
  # Defaults deny, which makes the plugin defer publish and read decisions to the ACL
  # file; that file allows every SUBSCRIBE, so the node role must refuse them itself.
  printf '{\n  "defaultACLAccess": {"publishClientSend": false, "publishClientReceive": false, "subscribe": false, "unsubscribe": true},\n'
  printf '  "roles": [\n    {"rolename": "nodewatt-node", "acls": [{"acltype": "subscribePattern", "topic": "#", "allow": false}]}'
  # The ACL file's `pattern write` lines serve every login, so one that is no node would
  # publish samples as a node named after it: collectors and the admin publish nothing.
  printf ',\n    {"rolename": "nodewatt-collector", "acls": [{"acltype": "publishClientSend", "topic": "#", "allow": false}]}'
  # The admin: the plugin's control topics only. "#" does not match them ($), so the admin,
  # too, can join no share group, and the denials below leave its control topics alone.
  ctl="\$CONTROL/dynamic-security/#"
  [ -z "$admin" ] || printf ',\n    {"rolename": "nodewatt-admin", "acls": [%s, %s, %s, %s, %s]}' \
    "{\"acltype\": \"publishClientSend\", \"topic\": \"$ctl\", \"allow\": true}" \
    "{\"acltype\": \"publishClientReceive\", \"topic\": \"$ctl\", \"allow\": true}" \
    "{\"acltype\": \"subscribePattern\", \"topic\": \"$ctl\", \"allow\": true}" \
    '{"acltype": "publishClientSend", "topic": "#", "allow": false}' \
    '{"acltype": "subscribePattern", "topic": "#", "allow": false}'
  printf '\n  ],\n'
  printf '  "clients": [\n'
  sep=
  for node in "${nodes[@]}"; do
    printf '%s' "$sep"
    client "$node" "\"clientid\": \"nodewatt-agent-$cluster-$node\", \"roles\": [{\"rolename\": \"nodewatt-node\"}], "
    sep=$',\n'
  done
  for c in "${collectors[@]}"; do
    printf '%s' "$sep"
    client "$c" '"roles": [{"rolename": "nodewatt-collector"}], '
  done
  if [ -n "$admin" ]; then
    printf '%s' "$sep"
    client "$admin" '"roles": [{"rolename": "nodewatt-admin"}], '
  fi
  printf '\n  ]\n}\n'
} >"$out/dynamic-security.json.new"
mv "$out/dynamic-security.json.new" "$out/dynamic-security.json"

# The ACL file, as config/mosquitto.acl but for this cluster and these collector logins: a
# cluster name that differs from the agents' makes the broker acknowledge and drop every
# sample, which MQTT 3.1.1 reports to no one. Names are valid topic levels (valid above).
{
  printf '# Written by broker-users.sh for cluster %s: install as /etc/mosquitto/nodewatt.acl\n' "$cluster"
  printf '# (root:mosquitto 0640). config/mosquitto.acl explains the rules.\n'
  printf 'pattern write nodewatt/v1/%s/%%u/sample\n' "$cluster"
  printf 'pattern write nodewatt/v1/%s/%%u/status\n' "$cluster"
  for c in "${collectors[@]}"; do
    printf '\nuser %s\ntopic read nodewatt/v1/#\n' "$c"
  done
} >"$out/nodewatt.acl.new"
mv "$out/nodewatt.acl.new" "$out/nodewatt.acl"

# mosquitto_rr reads options from $XDG_CONFIG_HOME/mosquitto_rr, one a line, the rest of
# the line its value: so no password appears on a command line. Its -f sends nothing in
# mosquitto 2.0, hence -m. It reads each line into 1024 bytes and takes the rest of a
# longer one for options: so one node a file, under 600 bytes with 64-character names.
# The directories are node-<node>, as a node's name may start with a dot, which `*`
# skips. A pending one for a node no longer listed would let it back in: deleted.
if [ -d "$out/add" ]; then
  for d in "$out/add"/node-*/; do
    [ -d "$d" ] || continue
    node=${d%/}
    node=${node##*/node-}
    if [ "${seen[$node]:-}" != node ]; then
      rm -rf -- "$d"
      echo "broker-users: deleted add/node-$node: no longer listed" >&2
    fi
  done
fi
if [ -n "$add" ]; then
  ctl="\$CONTROL/dynamic-security/v1"
  pending=0
  for node in "${nodes[@]}"; do
    d=$out/add/node-$node
    [ -n "${new[$node]:-}" ] || [ -d "$d" ] || continue
    # createClient takes the password itself; base64url needs no quoting in JSON.
    m="{\"commands\": [{\"command\": \"createClient\", \"username\": \"$node\", \"password\": \"${pws[$node]}\", \"clientid\": \"nodewatt-agent-$cluster-$node\", \"roles\": [{\"rolename\": \"nodewatt-node\"}]}]}"
    # Only a password file written by hand can make a line too long.
    if [ $((${#m} + 4)) -gt 1023 ] || [ $((${#pws[$admin]} + 4)) -gt 1023 ]; then
      die "add/node-$node: a line over mosquitto_rr's 1023 bytes: shorter passwords"
    fi
    mkdir -p "$d"
    printf -- '-u %s\n-P %s\n-t %s\n-e %s/response\n-m %s\n' \
      "$admin" "${pws[$admin]}" "$ctl" "$ctl" "$m" >"$d/mosquitto_rr"
    pending=$((pending + 1))
  done
  [ $pending -eq 0 ] ||
    echo "broker-users: add/node-*/mosquitto_rr create $pending nodes on the running broker" >&2
fi

echo "broker-users: ${#nodes[@]} nodes of cluster $cluster, ${#collectors[@]} collector logins ($created new passwords) in $out" >&2
