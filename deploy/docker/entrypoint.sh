#!/bin/sh
# Container entry point: seed the shared bundle volume with the demo bundle baked into the image
# (only when the volume holds no bundle yet), then run the given command.
#
# Safe when several replicas start at once on the same volume: each version directory is copied
# to a private staging name and renamed into place (a rename onto an existing version fails and
# is dropped), and CURRENT is written last, by rename, so a reader never sees a half-copied bundle
# (the same protocol as repair/bundle.py).
set -eu

bundle="${REPAIR_BUNDLE:-/data/bundle}"
seed="${REPAIR_SEED_BUNDLE:-/opt/repair-proxy/demo}"

if [ ! -f "$bundle/CURRENT" ] && [ -f "$seed/CURRENT" ]; then
  mkdir -p "$bundle/versions"
  for src in "$seed"/versions/*; do
    id="$(basename "$src")"
    [ -e "$bundle/versions/$id" ] && continue
    staging="$bundle/.seed-$id-$$"
    cp -R "$src" "$staging"
    mv -T "$staging" "$bundle/versions/$id" 2>/dev/null || rm -rf "$staging"
  done
  if [ ! -f "$bundle/CURRENT" ]; then
    cp "$seed/CURRENT" "$bundle/.CURRENT-seed-$$"
    mv -f "$bundle/.CURRENT-seed-$$" "$bundle/CURRENT"
  fi
  echo "entrypoint: seeded $bundle with the demo bundle (version $(cat "$bundle/CURRENT"))" >&2
fi

exec "$@"
