#!/usr/bin/env bash
# Builds the Debian package: OUTDIR/vhost-user-md_VERSION_ARCH.deb (OUTDIR defaults to
# target/debian). Runs `cargo build --release --locked`, generates the manual pages and
# shell completions from the binary, and packs them with the systemd units in
# packaging/systemd/*.service, the example configuration packaging/disk.conf.example
# (when present), README.md and packaging/deb/{copyright,postinst,postrm}.
#
# Usage: packaging/build-deb.sh [OUTDIR]
# Needs: cargo, dpkg-deb, strip, gzip; dpkg-shlibdeps (dpkg-dev) for the Depends field
# when installed, else Depends: libc6 (>= 2.34).
# Environment: DEB_MAINTAINER (the Maintainer field), SOURCE_DATE_EPOCH (the date of the
# pages, the changelog and the files; default: the last commit's), CARGO_TARGET_DIR.
set -euo pipefail

usage() {
    echo "usage: $0 [OUTDIR]" >&2
    exit 2
}
[ $# -le 1 ] || usage
case "${1:-}" in -*) usage ;; esac

root=$(cd "$(dirname "$0")/.." && pwd)
outdir=$(realpath -m "${1:-$root/target/debian}")
cd "$root"

for tool in cargo dpkg dpkg-deb strip gzip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$0: $tool is missing" >&2
        exit 1
    fi
done

name=vhost-user-md
maintainer=${DEB_MAINTAINER:-"vhost-user-md maintainers <vhost-user-md@localhost>"}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

echo "== cargo build --release --locked"
cargo build --release --locked
target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target_dir/release/$name"
[ -x "$bin" ] || {
    echo "$0: $bin was not built" >&2
    exit 1
}

# "vhost-user-md 0.2.0-rc.1" -> 0.2.0~rc.1 (a pre-release sorts before its release).
cargo_version=$("$bin" --version | awk '{print $2}')
version=${cargo_version/-/\~}
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/root"
doc="$pkg/usr/share/doc/$name"
install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/share/man/man1" "$doc" \
    "$pkg/etc/$name"

install -m 0755 "$bin" "$pkg/usr/bin/$name"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$pkg/usr/bin/$name"

echo "== manual pages and completions"
"$bin" generate-docs --out "$stage/docs" --date "$(date -u -d "@$SOURCE_DATE_EPOCH" +%F)"
for page in "$stage"/docs/man/*.1; do
    gz="$pkg/usr/share/man/man1/${page##*/}.gz"
    gzip -9n <"$page" >"$gz"
    chmod 0644 "$gz"
done
install -D -m 0644 "$stage/docs/completions/$name.bash" \
    "$pkg/usr/share/bash-completion/completions/$name"
install -D -m 0644 "$stage/docs/completions/_$name" \
    "$pkg/usr/share/zsh/vendor-completions/_$name"
install -D -m 0644 "$stage/docs/completions/$name.fish" \
    "$pkg/usr/share/fish/vendor_completions.d/$name.fish"

shopt -s nullglob
units=(packaging/systemd/*.service)
shopt -u nullglob
if [ ${#units[@]} -gt 0 ]; then
    install -d -m 0755 "$pkg/lib/systemd/system"
    install -m 0644 "${units[@]}" "$pkg/lib/systemd/system/"
fi
if [ -f packaging/disk.conf.example ]; then
    install -D -m 0644 packaging/disk.conf.example "$doc/examples/disk.conf"
fi
install -m 0644 README.md "$doc/README.md"

# The crates linked into the program, as "name version (license)" lines of the
# copyright file's Comment field.
crates=$(cargo tree --locked -e normal,no-proc-macro --prefix none -f '{p}|{l}' |
    sed -e 's/ (\*)$//' -e 's| (/[^)]*)||' | sort -u |
    awk -F'|' -v self="$name" '$1 !~ "^" self " " { printf " %s (%s)\n", $1, $2 }')
# The years of the project's commits, e.g. 2025-2026.
first_year=$(git log --reverse --format=%ad --date=format:%Y 2>/dev/null | awk 'NR == 1') ||
    first_year=
last_year=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
years=${first_year:-$last_year}
[ "$years" = "$last_year" ] || years="$years-$last_year"
awk -v crates="$crates" -v years="$years" '
    $0 == " @CRATES@" { print crates; next }
    { sub(/@YEARS@/, years); print }' packaging/deb/copyright >"$doc/copyright"
chmod 0644 "$doc/copyright"

# A native package's changelog: this version, dated like the build.
{
    echo "$name ($version) unstable; urgency=medium"
    echo
    echo "  * Version $cargo_version."
    echo
    echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

install -m 0755 packaging/deb/postinst packaging/deb/postrm "$pkg/DEBIAN/"

depends="libc6 (>= 2.34)"
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    mkdir -p "$stage/debian"
    printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$name" "$name" \
        >"$stage/debian/control"
    shlibs=$(cd "$stage" && dpkg-shlibdeps -O "-eroot/usr/bin/$name" 2>/dev/null |
        sed -n 's/^shlibs:Depends=//p')
    if [ -n "$shlibs" ]; then
        depends=$shlibs
    else
        echo "$0: dpkg-shlibdeps found nothing; Depends: $depends" >&2
    fi
    rm -rf "$stage/debian"
fi

installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Suggests: libdlm3, corosync, dlm-controld, qemu-system-x86
Section: admin
Priority: optional
Description: vhost-user-blk backend serving a clustered RAID1 (md-cluster)
 vhost-user-md serves a RAID1 mirror of two or more legs (block devices or
 image files) to QEMU virtual machines as a virtio-blk disk over a
 vhost-user socket. The legs carry the Linux md on-disk format (version 1.2
 superblocks, write-intent bitmaps, md-cluster per-node bitmaps), so mdadm
 and the kernel's md driver read them too.
 .
 Several hosts can serve one array at once through the Linux DLM (corosync
 and dlm_controld; libdlm3 is loaded when used), or several processes of one
 host through its own lock daemon.
EOF

(cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) >"$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/md5sums"
find "$pkg" -exec touch --no-dereference -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$outdir"
deb="$outdir/${name}_${version}_${arch}.deb"
dpkg-deb --build --root-owner-group "$pkg" "$deb"
echo "$deb"
