#!/usr/bin/env bash
# userdata.sh REGISTRY [KEY=VALUE...]
#
# Prints the repository's cloud-init/launch-template.yaml, the user data an
# operator puts in a launch template, with only what an operator (or the
# test) changes:
#
#   REGISTRY    replaces the value of AUTO_CONSUL_REGISTRY
#               (s3://BUCKET/PREFIX)
#   KEY=VALUE   replaces the value of KEY in the env file's content
#               (AUTO_CONSUL_ROLE, AUTO_CONSUL_SERVERS, ...), or, for a key
#               the template does not have, appends a line to that content
#               (AWS_ENDPOINT_URL, AWS_EC2_METADATA_SERVICE_ENDPOINT,
#               CONSUL_HTTP_ADDR, ...)
#
# Everything else (comments, runcmd) is the template's, byte for byte, so
# the test runs the user data as EC2 would, not a copy of it. Values are
# limited to characters that need no quoting in an env file read both by
# systemd's EnvironmentFile= and by sh (runcmd sources it).
# Check the result with `cloud-init schema -c FILE`.
set -euo pipefail
registry=${1:?usage: userdata.sh REGISTRY [KEY=VALUE...]}
shift
template="$(dirname "${BASH_SOURCE[0]}")/../../cloud-init/launch-template.yaml"
pairs=("AUTO_CONSUL_REGISTRY=$registry" "$@")
for pair in "${pairs[@]}"; do
  [[ $pair =~ ^[A-Z_][A-Z0-9_]*=[A-Za-z0-9_./:@,+=-]*$ ]] ||
    { echo "userdata.sh: not KEY=VALUE with a plain value: $pair" >&2; exit 2; }
done
# awk: inside the `content: |` block of the env file (its lines are
# indented deeper than `content:`), replace KEY=... lines; after the
# block, append the keys not found.
awk -v pairs="$(printf '%s\n' "${pairs[@]}")" '
  BEGIN {
    n = split(pairs, list, "\n")
    for (i = 1; i <= n; i++) if (list[i] != "") {
      k = substr(list[i], 1, index(list[i], "=") - 1)
      value[k] = list[i]; order[++keys] = k
    }
  }
  function flush(   i) {
    for (i = 1; i <= keys; i++) if (!(order[i] in seen)) print indent value[order[i]]
    done = 1
  }
  {
    if (inblock) {
      if ($0 ~ /^[ \t]*$/ || match($0, /^ */) && RLENGTH <= cindent) {
        flush(); inblock = 0
      } else {
        match($0, /^ */); indent = substr($0, 1, RLENGTH)
        k = substr($0, RLENGTH + 1); k = substr(k, 1, index(k, "=") - 1)
        if (k in value) { print indent value[k]; seen[k] = 1; next }
      }
    }
    print
    if (!done && $0 ~ /path: \/etc\/auto-consul\/auto-consul\.env$/) envfile = 1
    if (envfile && !done && $0 ~ /^ *content: \|$/) {
      match($0, /^ */); cindent = RLENGTH; inblock = 1; envfile = 0
    }
  }
  END {
    if (inblock) flush()
    if (!done) { print "userdata.sh: no env file content block in the template" > "/dev/stderr"; exit 1 }
  }
' "$template"
