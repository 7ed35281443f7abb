#!/bin/sh
# Install event-bridge from this checkout as a systemd service (what `make install` runs).
#
#   PREFIX      the venv holding the daemon            (default /opt/event-bridge)
#   SYSCONFDIR  config: bridge.toml, functions/, conf.d (default /etc/event-bridge)
#   UNITDIR     where the unit file goes                (default /etc/systemd/system)
#   BINDIR      where the event-bridge symlink goes     (default /usr/local/bin)
#   DESTDIR     prefix of all of the above, for staging or packaging: the tree runs once
#               moved to / (the venv names PREFIX)      (default empty)
#   EXTRAS      setup.cfg extras to install, or none    (default all)
#   PYTHON      interpreter for the venv (>= 3.11)      (default python3)
#
# Re-running it upgrades the venv and the unit; an existing bridge.toml and functions/ are kept.
set -eu

PREFIX=${PREFIX:-/opt/event-bridge}
SYSCONFDIR=${SYSCONFDIR:-/etc/event-bridge}
UNITDIR=${UNITDIR:-/etc/systemd/system}
BINDIR=${BINDIR:-/usr/local/bin}
DESTDIR=${DESTDIR:-}
EXTRAS=${EXTRAS:-all}
PYTHON=${PYTHON:-python3}
SRC=$(cd "$(dirname "$0")/.." && pwd)

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "error: event-bridge needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
    exit 1
}

# a path as the pattern (or replacement) of sed's s|…|…|: its special characters escaped
sed_text() { printf '%s\n' "$1" | sed 's/[][|&\\.*^$/]/\\&/g'; }

venv=$DESTDIR$PREFIX
echo "==> venv $venv"
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
# (python -m pip: a staged venv's scripts name $PREFIX, where it is not yet)
"$venv/bin/python" -m pip install --quiet --upgrade pip
spec=$SRC
[ "$EXTRAS" != none ] && spec="$SRC[$EXTRAS]"
"$venv/bin/python" -m pip install --quiet --upgrade "$spec"
if [ -n "$DESTDIR" ]; then
    # A venv's scripts name the path it was made at: staged under DESTDIR, they are made to
    # name PREFIX, where the tree runs once it is moved into place.
    grep -lIF -- "$venv" "$venv"/bin/* | while IFS= read -r f; do
        sed -i "s|$(sed_text "$venv")|$(sed_text "$PREFIX")|g" "$f"
    done
fi

doc=$venv/share/doc/event-bridge
install -d "$doc/docs"
install -m 0644 "$SRC/README.md" "$SRC/CHANGELOG.md" "$doc/"
install -m 0644 "$SRC"/docs/*.md "$doc/docs/"

echo "==> $DESTDIR$BINDIR/event-bridge -> $PREFIX/bin/event-bridge"
install -d "$DESTDIR$BINDIR"
ln -sfn "$PREFIX/bin/event-bridge" "$DESTDIR$BINDIR/event-bridge"

echo "==> unit $DESTDIR$UNITDIR/event-bridge.service"
install -d "$DESTDIR$UNITDIR"
# the unit names the default paths: the config, the venv's docs, systemd's config directory
# (named relative to /etc; a SYSCONFDIR elsewhere has none)
case $SYSCONFDIR in
    /etc/?*) confdir="ConfigurationDirectory=${SYSCONFDIR#/etc/}" ;;
    *) confdir="# ConfigurationDirectory= (SYSCONFDIR $SYSCONFDIR is not under /etc)" ;;
esac
# (each default is replaced where it stands, so that one given path holding another default
# is not replaced again)
bin=$(sed_text "$BINDIR") etc=$(sed_text "$SYSCONFDIR") opt=$(sed_text "$PREFIX")
sed -e "s|^\(Exec[A-Za-z]*=\)/usr/local/bin/event-bridge |\1$bin/event-bridge |" \
    -e "s|^\(Environment=EVENT_BRIDGE_CONFIG=\)/etc/event-bridge/|\1$etc/|" \
    -e "s|^\(# .*\)/etc/event-bridge/|\1$etc/|" \
    -e "s|^\(Documentation=file:\)/opt/event-bridge/|\1$opt/|" \
    -e "s|^ConfigurationDirectory=event-bridge\$|$(sed_text "$confdir")|" \
    "$SRC/systemd/event-bridge.service" >"$DESTDIR$UNITDIR/event-bridge.service"
chmod 0644 "$DESTDIR$UNITDIR/event-bridge.service"

conf=$DESTDIR$SYSCONFDIR
echo "==> config $conf"
install -d -m 0755 "$conf" "$conf/conf.d" "$conf/functions"
if [ ! -e "$conf/bridge.toml" ]; then
    install -m 0644 "$SRC/examples/service.toml" "$conf/bridge.toml"
    install -d -m 0755 "$conf/functions/hello"
    install -m 0644 "$SRC/examples/functions/hello/index.py" "$conf/functions/hello/index.py"
else
    echo "    keeping the existing $conf/bridge.toml"
fi

cat <<NEXT

event-bridge is installed. Next:
  event-bridge validate -c $SYSCONFDIR/bridge.toml     # check the config
  systemctl daemon-reload && systemctl enable --now event-bridge
  event-bridge status                                    # reaches the service through its control socket
  journalctl -u event-bridge -f                          # its logs
Put functions under $SYSCONFDIR/functions/ (the unit's sandbox makes /home invisible and
everything but the state directory read-only) and reload with: systemctl reload event-bridge
NEXT
