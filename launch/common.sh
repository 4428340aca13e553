# Sourced by the launch scripts: `run CMD ARGS...` executes, or with dry=1 (--dry_run) prints the command
# with shell quoting, one line each, so that a dry run shows exactly what would be run.
quote() {
  local out='' a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@,+%~-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s\n' "${out% }"
}
run() {
  if [[ -n ${dry:-} ]]; then quote "$@"; else "$@"; fi
}
