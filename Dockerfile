# The AMS-Build server as an image: `amsbuild serve`, talking to the host's Docker engine.
#
#   docker build -t amsbuild .
#   docker run -d --name amsbuild --restart unless-stopped --stop-timeout 120 \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /var/lib/amsbuild:/var/lib/amsbuild \
#     -p 8080:8080 -p 8081:8081 amsbuild
#
# The data directory must be mounted at the same path it has on the host: the server asks the
# host's engine to bind-mount each build's folders by their paths, and the engine looks those
# paths up on the host. See README.md, "Install", for this and the other constraints.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p amsbuild \
    && install -D -m 0755 target/release/amsbuild /out/amsbuild

FROM debian:bookworm-slim
# git (and ssh for ssh:// remotes) updates projects; ca-certificates for https remotes and
# notifications; tini reaps the processes git leaves behind, since the server is PID 1.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git openssh-client tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/amsbuild /usr/local/bin/amsbuild
ENV AMSBUILD_HOME=/var/lib/amsbuild
EXPOSE 8080 8081
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/amsbuild"]
CMD ["serve"]
