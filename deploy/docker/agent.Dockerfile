# relay-agent as a container, beside the printer (host or bridge network both
# work: the agent only dials out), static (musl) on an empty base.
#   docker build -f deploy/docker/agent.Dockerfile -t relay-agent .
#   docker run -d --restart=always -v /etc/relay/agent.toml:/etc/relay/agent.toml:ro relay-agent
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
COPY . .
RUN target="$(uname -m)-unknown-linux-musl" \
 && TARGET_CC=musl-gcc cargo build --release --locked --target "$target" -p relay-agent \
 && deploy/docker/image-root /out/root "target/$target/release/relay-agent"

# The image: the static binary, CA roots, /etc/passwd with the nonroot
# user, nothing else. scripts/build-images builds this stage, unchanged,
# from a binary built on the host.
FROM scratch
COPY --from=build /out/root/ /
# `kubectl exec … -- relayctl` finds the binaries by name.
ENV PATH=/usr/local/bin
# the nonroot user, by number (hadolint DL3066)
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/relay-agent"]
CMD ["--config", "/etc/relay/agent.toml"]
