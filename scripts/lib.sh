# shellcheck shell=bash
# Sourced by the scripts, not run: the loud skip, and the pinned tools they install from PyPI.

# skip_or_fail MESSAGE: says loudly that something was skipped and why. Under
# COINFLOW_STRICT=1 (CI) a skip is an error: it says so and returns 1.
skip_or_fail() {
  if [ "${COINFLOW_STRICT:-0}" = 1 ]; then
    echo "=== ERROR: $1, and COINFLOW_STRICT=1" >&2
    return 1
  fi
  echo "==================================================================" >&2
  echo "=== $1" >&2
  echo "==================================================================" >&2
}

# pip_tool VENV NAME==VERSION: makes VENV a venv holding that pinned package. A venv that
# already holds the pin is left alone, so a second run costs nothing; another pin reinstalls.
pip_tool() {
  local venv=$1 pin=$2
  [ "$(cat "$venv/.pin" 2>/dev/null)" = "$pin" ] && return 0
  echo "installing $pin into $venv" >&2
  python3 -m venv "$venv" \
    && "$venv/bin/pip" install --quiet --disable-pip-version-check "$pin" \
    && echo "$pin" > "$venv/.pin"
}
