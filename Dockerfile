# syntax=docker/dockerfile:1
# Build: docker build -t pacegate .   (profile-guided; --build-arg PGO=0: plain)
# Run:   docker run -p 8080:8080 -p 127.0.0.1:9090:9090 \
#          -v "$PWD/config/docker.toml:/etc/pacegate/pacegate.toml:ro" pacegate
# Mount your own copy of config/docker.toml, not config/pacegate.toml: in a
# container the listeners must bind 0.0.0.0 (docker.toml does, with the admin
# opt-in); publish the admin port on the host's loopback only.
# HTTPS interception is off with that command (a warning at start says so):
# its CA is created beside the config, and /etc/pacegate is not writable by
# the pacegate user. To have it, mount a directory of yours holding the
# config there and run as yourself; the first start writes ca.pem and
# ca-key.pem into it, for the callers to trust:
#   mkdir -p pacegate && cp config/docker.toml pacegate/pacegate.toml
#   docker run --user "$(id -u):$(id -g)" -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v "$PWD/pacegate:/etc/pacegate" pacegate

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# The manifest names bench and example targets, so the whole tree is copied
# (.dockerignore keeps target/ and VCS data out).
COPY . .
# PGO=1 (the default): the profile-guided build of scripts/build-pgo.sh,
# about a fifth less CPU a request, about 20 minutes to build on 2 cores (it
# apt-gets wrk and curl for its training load on loopback, and rustup's
# llvm-tools). PGO=0: the plain release build.
ARG PGO=1
RUN if [ "$PGO" = 1 ]; then scripts/build-pgo.sh && cp target/pgo/pacegate /pacegate; \
    else cargo build --release --locked --bin pacegate && cp target/release/pacegate /pacegate; fi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pacegate
COPY --from=build /pacegate /usr/local/bin/pacegate
COPY config/docker.toml /etc/pacegate/pacegate.toml
# Paths inside the config (the CA files too) are taken from its directory;
# this one is for relative paths given on the command line
# (`pacegate check --config x.toml`). Owned by root: the pacegate user reads
# it but cannot create the CA in it (see the top of this file).
WORKDIR /etc/pacegate
USER pacegate
ENV PACEGATE_CONFIG=/etc/pacegate/pacegate.toml PACEGATE_LOG=info
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pacegate"]
