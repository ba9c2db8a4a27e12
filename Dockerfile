# d7y-node in a container: run it with the host's network, e.g. (mirror and P2P only)
#   docker run -d --name d7y-node --network host -v /var/lib/d7y-node:/var/lib/d7y-node d7y-node
# As containerd's snapshotter it mounts FUSE filesystems that the host's containerd must see:
#   docker run -d --name d7y-node --network host --privileged --device /dev/fuse \
#     -v /var/lib/d7y-node:/var/lib/d7y-node:rshared -v /run/d7y-node:/run/d7y-node \
#     -v /run/containerd-nydus:/run/containerd-nydus d7y-node
# (rshared: mounts made under the data dir propagate to the host). A FUSE handover keeper dies
# with the container, so there a crashed node's mounts end instead of being handed over.
FROM python:3.11-slim-bookworm

WORKDIR /src
COPY pyproject.toml README.md ./
COPY d7y_node ./d7y_node
RUN pip install --no-cache-dir . && rm -rf /src

VOLUME /var/lib/d7y-node
EXPOSE 65001 65002 7946/udp
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; \
    sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:65002/healthz', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["d7y-node"]
CMD ["start"]
