#!/usr/bin/env bash
# The container for real: build bptvlm:latest, bring the server up through Compose, wait for its health
# check, run the client service against it with an API key from the ledger volume, check the summary,
# and tear down. For a Debian machine with root and no base image to pull (as CI has): it installs
# docker.io, docker-compose and debootstrap when missing, starts dockerd without container networks
# (--bridge=none --iptables=false; every container uses the host network, the server binds 127.0.0.1)
# and makes the base image from Debian's packages once (cached by tag). Where an engine already
# answers it is used as it is. It stops and removes only what it started. Exit 0 only if all passed.
#
#   bash scripts/container_smoke.sh
# Environment: SMOKE_BASE_IMAGE (an image to build on instead of the debootstrapped one, e.g.
# python:3.11-slim where it can be pulled), SMOKE_TASK (shape), SMOKE_BUDGET (2000), SMOKE_KEEP_ENGINE=1
# (leave a dockerd this script started running), COMPOSE (the compose command; default: `docker compose`
# when the v2 plugin answers, else `docker-compose`).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
BASE_TAG=bptvlm-base:bookworm-1      # bump the suffix when the debootstrap recipe below changes
PROJECT=bptvlm-smoke
TASK=${SMOKE_TASK:-shape}
BUDGET=${SMOKE_BUDGET:-2000}
FILES=(-f docker-compose.yml -f docker-compose.hostnet.yml -f docker-compose.ledger.yml)
WORK=$(mktemp -d /tmp/bptvlm-smoke.XXXXXX)
T0=$SECONDS
DOCKERD_PID=""
CREATED=()          # paths under docker-extra/ this run made (removed at exit)
COMPOSE_UP=0

say() { printf '[smoke %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { say "FAILED: $*"; exit 1; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$COMPOSE_UP" = 1 ]; then
        if [ "$rc" != 0 ]; then say "server logs (last 40 lines):"; compose logs --tail 40 server 2>&1 || true; fi
        compose down -v --remove-orphans >/dev/null 2>&1 || say "compose down failed"
    fi
    local p; for p in "${CREATED[@]}"; do rm -rf "$p"; done
    rmdir docker-extra 2>/dev/null || true
    if [ -n "$DOCKERD_PID" ] && [ "${SMOKE_KEEP_ENGINE:-0}" != 1 ]; then
        kill "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        say "stopped the dockerd it started (pid $DOCKERD_PID)"
    fi
    rm -rf "$WORK"
    say "$([ "$rc" = 0 ] && echo PASSED || echo "FAILED (exit $rc)") in $((SECONDS - T0)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# BPTVLM_PORT, BPTVLM_TASK and BPTVLM_BUDGET (exported below) fill the compose files' ${...} settings.
compose() { $COMPOSE -p "$PROJECT" "${FILES[@]}" "$@" </dev/null; }

install_missing() {
    local need=()
    command -v dockerd >/dev/null || need+=(docker.io)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
    if [ -z "${SMOKE_BASE_IMAGE:-}" ]; then command -v debootstrap >/dev/null || need+=(debootstrap); fi
    [ ${#need[@]} = 0 ] && return
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "needs ${need[*]}: install them (Debian: apt-get install ${need[*]}) or run as root"
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}" >"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log"; die "apt-get install ${need[*]}"; }
}

start_engine() {
    if docker info >/dev/null 2>&1; then say "using the Docker engine that is already running"; return; fi
    [ "$(id -u)" = 0 ] || die "no Docker engine answers and starting one needs root"
    say "starting dockerd --bridge=none --iptables=false (log: /var/log/bptvlm-smoke-dockerd.log)"
    setsid dockerd --bridge=none --iptables=false >/var/log/bptvlm-smoke-dockerd.log 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        docker info >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 /var/log/bptvlm-smoke-dockerd.log; DOCKERD_PID=""; die "dockerd exited"; }
        sleep 0.5
    done
    die "dockerd did not answer within 60 s"
}

base_image() {
    if [ -n "${SMOKE_BASE_IMAGE:-}" ]; then BASE=$SMOKE_BASE_IMAGE; return; fi
    BASE=$BASE_TAG
    if docker image inspect "$BASE" >/dev/null 2>&1; then say "base image $BASE cached"; return; fi
    say "making $BASE with debootstrap (Debian 12 minbase + python3.11 + venv)"
    local root="$WORK/rootfs"
    timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" -c . | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$root"
}

# The host's pip reaches its index through a TLS-inspecting proxy and keeps the CPU torch wheel in a
# local folder; the build gets the same: the host's CA bundle and that wheel, in docker-extra/.
build_extras() {
    mkdir -p docker-extra
    TORCH_INDEX_ARG=(); TORCH_ARG=$TORCH_VERSION
    local cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
    [ -f "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
    if [ ! -e docker-extra/ca.crt ] && [ -f "$cert" ]; then cp "$cert" docker-extra/ca.crt; CREATED+=(docker-extra/ca.crt); fi
    local dirs dir wheel=""
    dirs="${PIP_FIND_LINKS:-} $(python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.find-links='\(.*\)'$/\1/p")"
    for dir in $dirs; do
        dir=${dir#file://}
        wheel=$(ls "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl 2>/dev/null | head -1) && [ -n "$wheel" ] && break
    done
    if [ -n "$wheel" ]; then
        if [ ! -e docker-extra/wheels ]; then
            mkdir docker-extra/wheels; CREATED+=(docker-extra/wheels)
            ln "$wheel" docker-extra/wheels/ 2>/dev/null || cp "$wheel" docker-extra/wheels/
        fi
        TORCH_INDEX_ARG=(--build-arg TORCH_INDEX=); TORCH_ARG="$TORCH_VERSION+cpu"
        say "torch from the host's wheel $(basename "$wheel")"
    else
        say "no local torch $TORCH_VERSION CPU wheel: torch from the Dockerfile's default index"
    fi
}

build_image() {
    local old; old=$(docker image inspect -f '{{.Id}}' bptvlm:latest 2>/dev/null || true)
    say "building bptvlm:latest on $BASE (log: $WORK/build.log while it runs)"
    local attempt
    for attempt in 1 2; do  # a second try resumes from the cached layers (a network hiccup in pip)
        timeout 1200 docker build --network host -t bptvlm:latest --build-arg BASE_IMAGE="$BASE" \
            --build-arg TORCH_VERSION="$TORCH_ARG" "${TORCH_INDEX_ARG[@]}" . >"$WORK/build.log" 2>&1 && break
        tail -40 "$WORK/build.log"
        [ "$attempt" = 2 ] && die "docker build"
        say "docker build failed; trying once more"
    done
    local new; new=$(docker image inspect -f '{{.Id}}' bptvlm:latest)
    if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi  # the image it replaced
    say "image bptvlm:latest $(docker image inspect -f '{{.Size}}' bptvlm:latest | awk '{printf "%.2f GB", $1/1e9}')"
}

wait_healthy() {
    local id status last=""
    id=$(compose ps -q server)
    [ -n "$id" ] || die "compose started no server container"
    for _ in $(seq 120); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
        [ "$status" != "$last" ] && say "server health: $status" && last=$status
        [ "$status" = healthy ] && return
        [ "$(docker inspect -f '{{.State.Running}}' "$id")" = true ] || die "the server container exited"
        sleep 2
    done
    die "the server was not healthy within 240 s"
}

check_summary() {  # the client's printed summary: zero-shot and tuned accuracy, the whole budget spent
    python3 - "$1" "$BUDGET" <<'EOF'
import re, sys
text, budget = open(sys.argv[1]).read(), int(sys.argv[2])
got = dict(re.findall(r"^(zero_shot_accuracy|test_accuracy|train_queries)\s+([0-9.]+)$", text, re.M))
missing = {"zero_shot_accuracy", "test_accuracy", "train_queries"} - got.keys()
if missing:
    sys.exit(f"the client's summary lacks {sorted(missing)}")
if not all(0 <= float(got[k]) <= 1 for k in ("zero_shot_accuracy", "test_accuracy")):
    sys.exit(f"accuracies outside [0, 1]: {got}")
if int(got["train_queries"]) != budget:
    sys.exit(f"train_queries {got['train_queries']} != budget {budget}")
print(f"zero-shot {float(got['zero_shot_accuracy']):.3f} -> tuned {float(got['test_accuracy']):.3f} ({budget} queries)")
EOF
}

install_missing
if [ -n "${COMPOSE:-}" ]; then :; elif docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi
say "compose: $($COMPOSE version 2>/dev/null | head -1)"
start_engine
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export BPTVLM_PORT=$PORT BPTVLM_TASK=$TASK BPTVLM_BUDGET=$BUDGET
compose down -v --remove-orphans >/dev/null 2>&1 || true    # what an interrupted earlier run left
base_image
build_extras
build_image

COMPOSE_UP=1
say "creating an API key in the ledger volume"
TOKEN=$(compose run --rm --no-deps -T server keys create --ledger /ledger/ledger.db --name smoke 2>"$WORK/keys.log" | tail -1) \
    || { cat "$WORK/keys.log"; die "keys create"; }
[ -n "$TOKEN" ] || die "keys create printed no token"
say "compose up server on 127.0.0.1:$PORT (host network)"
compose up -d --no-build server >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; die "compose up"; }
wait_healthy
say "running the client service: tune --task $TASK --budget $BUDGET"
BPTVLM_API_KEY=$TOKEN timeout 900 $COMPOSE -p "$PROJECT" "${FILES[@]}" run --rm -T client </dev/null 2>&1 \
    | tee "$WORK/client.log" || die "the client container failed"
summary=$(check_summary "$WORK/client.log") || die "the client's summary"
say "client summary: $summary"
usage=$(compose exec -T server bptvlm keys usage --ledger /ledger/ledger.db smoke)
charged=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['smoke']['candidates'])" "$usage") \
    && [ "$charged" -ge "$BUDGET" ] || die "the ledger did not charge the key the budget: $usage"
say "the ledger charged key 'smoke' $charged candidates"
