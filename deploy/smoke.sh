#!/usr/bin/env bash
# Build the image, start it as a user would, chat one turn, restart it, and remove it all.
#
#     sudo make smoke            (or: bash deploy/smoke.sh, as root, from anywhere)
#
# Not part of the tests: the image is several GB and the build downloads ~3 GB. Runs on a host
# with no GPU: the container serves on the CPU against the Telegram emulator of the tests
# (tests/fakes/telegram.py, started here on 127.0.0.1 with the project's .venv python), so the
# container shares the host's network. Steps:
#   1. Docker: uses the running daemon, or installs docker.io (Debian) and starts dockerd;
#   2. the base image: present, pulled, or made locally (deploy/base_image.sh);
#   3. the compose file checked by the compose installed here (docker-compose 1.x or v2);
#   4. `docker build --network host` (NO_CACHE=1 for a build from scratch; BUILD_ARGS for
#      e.g. the CPU-only image, see docs/deployment.md), image size;
#   5. without BOT_TOKEN the container must exit 2 with a message naming it;
#   6. start on named volumes: seconds to /healthz 200 and to Docker's own "healthy";
#   7. one chat turn through the emulator (a message in, the bot's finished answer out);
#   8. stop (seconds to exit after SIGTERM), a new container on the same volumes: healthy
#      again, the model not converted again, the conversation still there (/retry answers it).
# Everything it started (containers and their volumes, the emulator, dockerd, the image and
# its build's layer images unless KEEP_IMAGE=1) is removed on exit, also on failure; a base
# image it made stays, as a pulled one would. Exit 0 only if every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-loratg:smoke}
NO_CACHE=${NO_CACHE:-0}
# e.g. "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg TORCH_VARIANT=cpu"
BUILD_ARGS=${BUILD_ARGS:-}
KEEP_IMAGE=${KEEP_IMAGE:-0}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-600}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
NAME=loratg-smoke-$$
VOLUMES=(models adapters templates data)
WORK=$(mktemp -d /tmp/loratg-smoke.XXXXXX)
dockerd_pid="" emulator_pid="" built=0
declare -A RESULT=()

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
fail() { say "FAILED: $*"; exit 1; }

cleanup() {
  local rc=$?
  set +e
  say "cleaning up"
  docker rm -fv "$NAME" "$NAME-notoken" >/dev/null 2>&1
  for v in "${VOLUMES[@]}"; do docker volume rm -f "$NAME-$v" >/dev/null 2>&1; done
  [ -n "$emulator_pid" ] && kill "$emulator_pid" 2>/dev/null && wait "$emulator_pid" 2>/dev/null
  if [ "$built" = 1 ] && [ "$KEEP_IMAGE" != 1 ]; then
    # the image and every layer image this build made (the build stage's stay behind untagged);
    # not the base image: like a pulled one, it serves the next build
    docker rmi -f "$IMAGE" >/dev/null 2>&1
    docker images -aq --no-trunc | sort -u | comm -13 "$WORK/images.before" - | xargs -r docker rmi -f >/dev/null 2>&1
  fi
  if [ -n "$dockerd_pid" ]; then kill "$dockerd_pid" 2>/dev/null; wait "$dockerd_pid" 2>/dev/null; fi
  rm -rf "$WORK"
  say "smoke test $([ $rc = 0 ] && echo PASSED || echo "FAILED (exit $rc)")"
  exit $rc
}
trap cleanup EXIT

# ---- 1. Docker ------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "no Docker daemon answers and starting one needs root"
  command -v dockerd >/dev/null || { say "installing docker.io"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null; }
  say "starting dockerd (log: $WORK/dockerd.log)"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; fail "dockerd did not start"; }
fi
say "docker: client $(docker version -f '{{.Client.Version}}'), engine $(docker version -f '{{.Server.Version}}')"

# ---- 2. the base image --------------------------------------------------------------------
base=$(sed -nE 's/^ARG PYTHON_IMAGE=(.*)$/\1/p' Dockerfile)
bash deploy/base_image.sh "$base"

# ---- 3. the compose file ------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then compose=(docker compose)
else
  command -v docker-compose >/dev/null || { [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null; }
  compose=(docker-compose)
fi
mkdir -p "$WORK/compose" && cp docker-compose.yml "$WORK/compose/" && cp .env.example "$WORK/compose/.env"
for profile in "" vllm; do
  (cd "$WORK/compose" && COMPOSE_PROFILES=$profile "${compose[@]}" config -q) \
    || fail "${compose[*]} rejects docker-compose.yml (COMPOSE_PROFILES=$profile)"
done
RESULT[compose]="accepted by $("${compose[@]}" version --short 2>/dev/null || "${compose[@]}" version | head -1) (${compose[*]}), with and without the vllm profile"
say "compose: ${RESULT[compose]}"

# ---- 4. build -----------------------------------------------------------------------------
docker images -aq --no-trunc | sort -u >"$WORK/images.before"
say "building $IMAGE$([ "$NO_CACHE" = 1 ] && echo ' (no cache)')${BUILD_ARGS:+ with $BUILD_ARGS}"
t0=$(now)
# shellcheck disable=SC2086  # BUILD_ARGS: words on purpose
docker build --network host $([ "$NO_CACHE" = 1 ] && echo --no-cache) $BUILD_ARGS -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; fail "docker build"; }
built=1
RESULT[build]="$(since "$t0") s$([ "$NO_CACHE" = 1 ] && echo ', no cache' || echo ', layer cache allowed')"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
RESULT[size]=$(awk -v s="$size" 'BEGIN { printf "%.2f GB (%.0f bytes)", s / 1e9, s }')
say "built in ${RESULT[build]}; image ${RESULT[size]}"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | awk -F'\t' '$1 !~ /^0B$/ { printf "    %-8s %.90s\n", $1, $2 }'

# ---- 5. no token --------------------------------------------------------------------------
set +e
out=$(timeout 120 docker run --name "$NAME-notoken" --network none "$IMAGE" 2>&1); rc=$?
set -e
docker rm -fv "$NAME-notoken" >/dev/null 2>&1  # -v: its anonymous volumes (the image declares four)
echo "$out" | tail -3 | sed 's/^/    /'
[ "$rc" = 2 ] && grep -q BOT_TOKEN <<<"$out" || fail "without BOT_TOKEN: exit $rc, expected 2 and a message naming BOT_TOKEN"
RESULT[notoken]="exit 2, names BOT_TOKEN"

# ---- 6. start ----------------------------------------------------------------------------
"$PY" deploy/emulator.py "$WORK/emulator.json" >"$WORK/emulator.log" 2>&1 &
emulator_pid=$!
for _ in $(seq 100); do [ -s "$WORK/emulator.json" ] && break; sleep 0.1; done
[ -s "$WORK/emulator.json" ] || { cat "$WORK/emulator.log"; fail "the Telegram emulator did not start"; }
api=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["api"])' "$WORK/emulator.json")
control=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["control"])' "$WORK/emulator.json")
ops_port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "Telegram emulator: Bot API $api, control $control; ops port $ops_port"

start_container() {
  docker run -d --name "$NAME" --network host \
    -e BOT_TOKEN=4242:smoke-test-token -e BOT_API_URL="$api" -e OPS_PORT="$ops_port" -e ADMIN_IDS=7 \
    -e MAX_NEW_TOKENS=64 \
    -v "$NAME-models:/models" -v "$NAME-adapters:/adapters" -v "$NAME-templates:/templates" -v "$NAME-data:/data" \
    "$IMAGE" >/dev/null
}

# wait_healthy LABEL: seconds from `docker run` to /healthz 200 and to Docker's "healthy"
wait_healthy() {
  local label=$1 t0 t_http="" t_docker="" state code
  t0=$(now)
  start_container
  while [ -z "$t_docker" ] || [ -z "$t_http" ]; do
    state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$NAME")
    case $state in running*) ;; *) docker logs --tail 30 "$NAME"; fail "$label: the container is $state";; esac
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$ops_port/healthz" || true)
    [ -z "$t_http" ] && [ "$code" = 200 ] && t_http=$(since "$t0")
    [ -z "$t_docker" ] && [ "${state#* }" = healthy ] && t_docker=$(since "$t0")
    [ "$(since "$t0" | cut -d. -f1)" -lt "$HEALTH_TIMEOUT_S" ] \
      || { docker logs --tail 30 "$NAME"; fail "$label: not healthy within $HEALTH_TIMEOUT_S s (/healthz $code, Docker: $state)"; }
    sleep 0.25
  done
  RESULT[$label]="/healthz 200 at $t_http s, Docker \"healthy\" at $t_docker s (from docker run)"
  say "$label start: ${RESULT[$label]}"
  awk -v h="$t_http" -v d="$t_docker" 'BEGIN { exit !(d - h <= 10) }' \
    || fail "$label: Docker called it healthy $(awk -v h="$t_http" -v d="$t_docker" 'BEGIN { print d - h }') s after /healthz answered (> 10 s)"
}

say_to_bot() {  # say_to_bot TEXT -> the bot's finished answer as JSON
  curl -sf --max-time 600 -H 'Content-Type: application/json' \
    -d "$("$PY" -c 'import json,sys; print(json.dumps({"user": 7, "text": sys.argv[1], "timeout": 540}))' "$1")" \
    "$control/say" || { docker logs --tail 30 "$NAME"; fail "no answer to: $1"; }
}
field() {  # field JSON KEY [MAX_CHARS]
  "$PY" -c 'import json,sys; v = str(json.loads(sys.argv[1])[sys.argv[2]]); n = int(sys.argv[3]); print(v[:n] + ("..." if len(v) > n else ""))' \
    "$1" "$2" "${3:-100000}"
}
db_messages() {
  docker exec "$NAME" python -c 'import sqlite3; print(sqlite3.connect("/data/bot.sqlite3").execute("select count(*) from messages where user_id = 7").fetchone()[0])'
}
model_stamp() { docker exec "$NAME" sh -c 'stat -c "%Y %s" /models/*/model.safetensors'; }

wait_healthy first
[ "$(docker exec "$NAME" cat /proc/1/comm)" = tini ] || fail "PID 1 is $(docker exec "$NAME" cat /proc/1/comm), not tini"
RESULT[rss]=$(docker stats --no-stream --format '{{.MemUsage}}' "$NAME")
say "memory after the start: ${RESULT[rss]}"

# ---- 7. one chat turn ---------------------------------------------------------------------
question="What should I check before signing a rental contract?"
say "user 7: $question"
answer=$(say_to_bot "$question")
say "bot ($(field "$answer" seconds) s, $(field "$answer" edits) edits): $(field "$answer" reply 400)"
RESULT[chat]="answered in $(field "$answer" seconds) s, $(field "$answer" edits) streamed edits"
rows_before=$(db_messages)
model_before=$(model_stamp)
[ "$rows_before" -ge 2 ] || fail "the conversation is not in /data/bot.sqlite3 ($rows_before messages)"
say "SQLite: $rows_before messages of user 7; model file (mtime size): $model_before"

# ---- 8. restart on the same volumes -------------------------------------------------------
t0=$(now)
docker stop -t 30 "$NAME" >/dev/null
RESULT[stop]="$(since "$t0") s from SIGTERM to exit, exit code $(docker inspect -f '{{.State.ExitCode}}' "$NAME")"
say "stopped: ${RESULT[stop]}"
docker logs "$NAME" >"$WORK/first.log" 2>&1
docker rm "$NAME" >/dev/null
wait_healthy second
docker logs "$NAME" >"$WORK/second.log" 2>&1
grep -q "converted in" "$WORK/first.log" || fail "the first start's log does not show the model conversion"
! grep -q "converted in" "$WORK/second.log" || fail "the second start converted the model again"
[ "$(model_stamp)" = "$model_before" ] || fail "the converted model changed: $model_before -> $(model_stamp)"
[ "$(db_messages)" = "$rows_before" ] || fail "the conversation changed over the restart: $rows_before -> $(db_messages) messages"
again=$(say_to_bot /retry)
say "bot, /retry after the restart ($(field "$again" seconds) s): $(field "$again" reply 300)"
[ "$(db_messages)" -gt "$rows_before" ] || fail "/retry after the restart stored no new answer"
RESULT[restart]="model not converted again (same file), $rows_before messages kept, /retry answered the stored question"
grep -h "ops server listening" "$WORK/second.log" | tail -1 | sed 's/^/    /'

echo
echo "== deploy/smoke.sh: $(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load $(cut -d' ' -f1 /proc/loadavg)"
for k in compose build size notoken first rss chat stop second restart; do printf '  %-8s %s\n' "$k" "${RESULT[$k]}"; done
