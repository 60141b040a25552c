# Step-by-step messages for the set-up scripts (sourced by setup_env.sh, setup_env_latest.sh, bench.sh):
#   asag_step "what starts"   prints "==> [HH:MM:SS] what starts ..." and starts its clock
#   asag_step_done [note]     prints "==> what starts: done in N s" (the step's wall time) with an optional note
# pip itself stays quiet (-q): these lines are what the user sees while it works.
asag_step() {
  _asag_step_name="$1"
  _asag_step_t0=$(date +%s)
  printf '==> [%s] %s ...\n' "$(date -u +%H:%M:%S)" "$1"
}
asag_step_done() {
  printf '==> %s: done in %s s%s\n' "${_asag_step_name:-step}" "$(( $(date +%s) - ${_asag_step_t0:-$(date +%s)} ))" \
    "${1:+ ($1)}"
}
