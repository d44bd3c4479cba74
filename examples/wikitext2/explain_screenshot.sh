#!/usr/bin/env bash
# Screenshot of a knnlm-explain web page in headless Chromium (Debian: apt-get install chromium).
#   bash examples/wikitext2/explain_screenshot.sh PAGE.html OUT.png [HASH] [WIDTH,HEIGHT]
# HASH selects a token on load: "best" (the token kNN helped most, the default) or "pos=N".
# Fails if the page logs anything to the console (the page itself logs nothing).
set -euo pipefail
page="$1"; out="$2"; hash="${3:-best}"; size="${4:-1200,640}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
  echo "explain_screenshot.sh: no chromium: apt-get install -y chromium" >&2; exit 2
fi
url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")#$hash"
mkdir -p "$(dirname "$out")"
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --enable-logging=stderr \
  --v=0 --window-size="$size" --screenshot="$out" "$url" 2> "$log" >/dev/null
if grep -q ":CONSOLE" "$log"; then
  grep ":CONSOLE" "$log" >&2; echo "explain_screenshot.sh: the page logged errors" >&2; exit 1
fi
echo "wrote $out ($(du -k "$out" | cut -f1) KB)"
