# Sourced first by the bash bench scripts, with their arguments: as knobsOnly in tools.mjs, their
# settings are environment variables, documented in their opening comment. --help (or -h) prints
# that comment; any other argument is refused (exit 2) rather than ignored.
if (($#)); then
  if [[ $# == 1 && ($1 == --help || $1 == -h) ]]; then
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
  fi
  echo "bench:$(basename "$0" .sh): takes no arguments (got $*); its settings are environment variables, which npm run bench:$(basename "$0" .sh) -- --help lists." >&2
  exit 2
fi
