# relay-edge (with relayctl for migrations and provisioning), static (musl)
# on an empty base.
#   docker build -f deploy/docker/edge.Dockerfile -t relay-edge .
#   docker run -p 8443:8443 -p 8883:8883 -p 7443:7443/udp -p 7443:7443 -p 9090:9090 \
#     -e RELAY_DATABASE_URL=postgres://relay@db/relay -v /etc/relay:/etc/relay:ro \
#     relay-edge --config /etc/relay/edge.toml
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
 && TARGET_CC=musl-gcc cargo build --release --locked --target "$target" -p relay-edge -p relayctl \
 && deploy/docker/image-root /out/root "target/$target/release/relay-edge" "target/$target/release/relayctl"

# The image: the static binaries, CA roots, /etc/passwd with the nonroot
# user, nothing else. scripts/build-images builds this stage, unchanged,
# from binaries built on the host.
FROM scratch
COPY --from=build /out/root/ /
# `kubectl exec … -- relayctl` finds the binaries by name.
ENV PATH=/usr/local/bin
# the nonroot user, by number (hadolint DL3066)
USER 65532:65532
# wss, mqtts, agents' tunnel (QUIC on UDP, TLS on TCP where UDP is
# blocked), admin (/metrics, /healthz, /readyz)
EXPOSE 8443 8883 7443/udp 7443/tcp 9090
ENTRYPOINT ["/usr/local/bin/relay-edge"]
