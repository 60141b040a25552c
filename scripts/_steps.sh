# Sourced by the set-up scripts: `step "what"` prints what set-up does next and, at the next step (or
# `step_done`), how many seconds the previous one took, so a quiet pip run still shows progress.
_step_name="" _step_start=0
step_done() {
  if [ -n "$_step_name" ]; then
    printf '[setup] %s: done in %ss\n' "$_step_name" "$(( $(date +%s) - _step_start ))" >&2
  fi
  _step_name=""
}
step() {
  step_done
  _step_name="$1" _step_start=$(date +%s)
  printf '[setup] %s ...\n' "$1" >&2
}
