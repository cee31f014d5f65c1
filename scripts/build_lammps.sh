#!/usr/bin/env bash
# Build LAMMPS (4 Feb 2025, Debian trixie source) with SevenNet's pair styles
# `e3gnn` (serial) and `e3gnn/parallel` (MPI) against the pip-installed torch.
#
# Usage: scripts/build_lammps.sh [--serial|--mpi|--both] [--force] [--keep-tree]
#
#   --serial     (default) serial LAMMPS (MPI stubs, OpenMP on); has e3gnn and
#                e3gnn/parallel (the latter only useful with one rank)
#   --mpi        MPI LAMMPS (OpenMPI) for `mpirun -np N lmp` with e3gnn/parallel
#   --both       both builds, one after the other
#   --force      rebuild even when a binary for this key is already cached
#   --keep-tree  keep the patched source and build tree next to the binary
#
# Output: progress on stderr; the full cmake/make output goes to a log file in
# the cache dir. The LAST line on stdout is the absolute path of the built
# `lmp` (with --both: the MPI path first, then the serial path last).
#
# Cache: ${SEVENN_MF_LAMMPS_CACHE:-$HOME/.cache/sevenn_mf/lammps}/<key>/bin/lmp
#   key = lammps-20250204_sevenn-<ver>_torch-<ver>_<serial|mpi>
#   (versions sanitised to [A-Za-z0-9._-], e.g. torch-2.13.0-cpu)
# A cached binary is reused (path printed, exit 0) unless the files in
# patches/ changed since it was built, or --force is given.
#
# Environment:
#   SEVENN_MF_LAMMPS_CACHE    cache root (see above)
#   SEVENN_MF_LAMMPS_TARBALL  path to a local lammps_20250204+dfsg.1.orig.tar.xz
#                             (offline builds; its sha256 is still checked)
#   SEVENN_MF_LAMMPS_JOBS     parallel make jobs (default: nproc)
#   SEVENN_MF_PYTHON          python with sevenn + torch (default: python3)
#
# Needs root (or password-less sudo) only for what is missing: apt build
# dependencies (cmake g++ make xz-utils patch; libopenmpi-dev openmpi-bin for
# --mpi) and the Debian trixie deb-src entry + `apt-get update` used to fetch
# the LAMMPS source tarball.
set -Eeuo pipefail
trap 'rc=$?; echo "[build_lammps] ERROR: unexpected failure (exit $rc) at line $LINENO: $BASH_COMMAND" >&2' ERR

# --------------------------------------------------------------------------
# pinned LAMMPS source: Debian trixie's orig tarball (upstream 4 Feb 2025)
LAMMPS_KEYVER=20250204
LAMMPS_DEB_UPSTREAM="20250204+dfsg.1"
LAMMPS_ORIG="lammps_${LAMMPS_DEB_UPSTREAM}.orig.tar.xz"
LAMMPS_ORIG_SHA256="3671165bd52fad36734e0a9136c5bc5ecb225e03988f8c89aa13366a8b53b1c7"
LAMMPS_TOPDIR="lammps-4Feb2025"
TRIXIE_SRC_LIST="/etc/apt/sources.list.d/sevenn-mf-trixie-src.sources"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
PATCH_DIR="$REPO_DIR/patches"
CACHE_ROOT="${SEVENN_MF_LAMMPS_CACHE:-$HOME/.cache/sevenn_mf/lammps}"
JOBS="${SEVENN_MF_LAMMPS_JOBS:-$(nproc 2>/dev/null || echo 2)}"

log() { echo "[build_lammps] $*" >&2; }
die() {
    echo "[build_lammps] ERROR: $*" >&2
    exit 1
}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; }

# --------------------------------------------------------------------------
KINDS=(serial)
FORCE=0
KEEP_TREE=0
for arg in "$@"; do
    case "$arg" in
        --serial) KINDS=(serial) ;;
        --mpi) KINDS=(mpi) ;;
        --both) KINDS=(serial mpi) ;;
        --force) FORCE=1 ;;
        --keep-tree) KEEP_TREE=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage
            die "unknown argument: $arg"
            ;;
    esac
done

# --------------------------------------------------------------------------
# python / versions (importlib.metadata: fast, no torch import)
if [[ -n "${SEVENN_MF_PYTHON:-}" ]]; then
    PYTHON="$SEVENN_MF_PYTHON"
elif command -v python3 >/dev/null 2>&1; then
    PYTHON=python3
else
    PYTHON=python
fi
versions=$("$PYTHON" - <<'EOF' 2>/dev/null
import importlib.metadata as m
print(m.version('sevenn'), m.version('torch'))
EOF
) || die "cannot read sevenn/torch versions with '$PYTHON' (is sevenn installed? set SEVENN_MF_PYTHON)"
read -r SEVENN_VER TORCH_VER <<<"$versions"
sanitize() { echo "$1" | sed 's/[^A-Za-z0-9._-]/-/g'; }

key_for() { echo "lammps-${LAMMPS_KEYVER}_sevenn-$(sanitize "$SEVENN_VER")_torch-$(sanitize "$TORCH_VER")_$1"; }

# fingerprint of our patches + this script's build recipe; a change rebuilds
patch_hash() {
    {
        for f in "$PATCH_DIR"/*.patch; do
            [[ -e "$f" ]] && sha256sum <"$f"
        done
        echo "recipe-v1"
    } | sha256sum | cut -c1-16
}
PATCH_HASH=$(patch_hash)

# --------------------------------------------------------------------------
# privileged helpers
have_root() { [[ $EUID -eq 0 ]] || sudo -n true >/dev/null 2>&1; }
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif sudo -n true >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root (or password-less sudo) to run: $*
  Run this script as root once, or do that step by hand and re-run."
    fi
}

APT_UPDATED=0
apt_update() {
    [[ $APT_UPDATED -eq 1 ]] && return 0
    log "apt-get update"
    local out rc=0
    out=$(as_root env DEBIAN_FRONTEND=noninteractive apt-get update 2>&1) || rc=$?
    echo "$out" >>"${LOGFILE:-/dev/null}"
    if [[ $rc -ne 0 ]] || grep -qE '^(W|E): (Failed to fetch|Some index files failed)' <<<"$out"; then
        log "apt-get update reported problems (offline? no mirror access?):"
        grep -E '^(W|E):' <<<"$out" | head -5 >&2 || true
    fi
    APT_UPDATED=1
}

# --------------------------------------------------------------------------
# build dependencies
ensure_deps() {
    local kind=$1
    local pkgs=()
    command -v cmake >/dev/null 2>&1 || pkgs+=(cmake)
    command -v g++ >/dev/null 2>&1 || pkgs+=(g++)
    command -v make >/dev/null 2>&1 || pkgs+=(make)
    command -v xz >/dev/null 2>&1 || pkgs+=(xz-utils)
    command -v patch >/dev/null 2>&1 || pkgs+=(patch)
    command -v sha256sum >/dev/null 2>&1 || pkgs+=(coreutils)
    if [[ $kind == mpi ]]; then
        if ! command -v mpicxx >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1 ||
            ! dpkg -s libopenmpi-dev >/dev/null 2>&1; then
            pkgs+=(libopenmpi-dev openmpi-bin)
        fi
    fi
    [[ ${#pkgs[@]} -eq 0 ]] && return 0
    have_root || die "missing build dependencies: ${pkgs[*]}
  Install them as root: apt-get install -y ${pkgs[*]}"
    log "installing build dependencies: ${pkgs[*]}"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$LOGFILE" 2>&1; then
        apt_update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$LOGFILE" 2>&1 ||
            die "apt-get install ${pkgs[*]} failed (offline?); see $LOGFILE"
    fi
}

# --------------------------------------------------------------------------
# LAMMPS source tarball
# prints "<debian version> <sha256>" of the trixie orig tarball from apt's index
showsrc_entry() {
    apt-cache showsrc lammps 2>/dev/null | awk -v orig="$LAMMPS_ORIG" '
        /^Version:/ { v = $2 }
        /^Checksums-Sha256:/ { c = 1; next }
        /^[^ ]/ { c = 0 }
        c && $3 == orig { print v, $1; exit }' || true
}

fetch_tarball() {
    local dl_dir="$CACHE_ROOT/downloads"
    local tarball="$dl_dir/$LAMMPS_ORIG"
    mkdir -p "$dl_dir"
    if [[ -f "$tarball" ]] && echo "$LAMMPS_ORIG_SHA256  $tarball" | sha256sum -c --status; then
        TARBALL="$tarball"
        return 0
    fi
    if [[ -n "${SEVENN_MF_LAMMPS_TARBALL:-}" ]]; then
        [[ -f "$SEVENN_MF_LAMMPS_TARBALL" ]] || die "SEVENN_MF_LAMMPS_TARBALL=$SEVENN_MF_LAMMPS_TARBALL: no such file"
        echo "$LAMMPS_ORIG_SHA256  $SEVENN_MF_LAMMPS_TARBALL" | sha256sum -c --status ||
            die "SEVENN_MF_LAMMPS_TARBALL: sha256 mismatch (expected $LAMMPS_ORIG_SHA256 for $LAMMPS_ORIG)"
        TARBALL="$SEVENN_MF_LAMMPS_TARBALL"
        return 0
    fi

    # find the trixie source package in apt's index; add the deb-src entry if needed
    local entry
    entry=$(showsrc_entry)
    if [[ -z "$entry" ]]; then
        have_root || die "the LAMMPS source tarball is not cached and apt has no Debian trixie deb-src index.
  As root, add $TRIXIE_SRC_LIST (Types: deb-src, URIs: http://deb.debian.org/debian,
  Suites: trixie, Components: main) and run apt-get update, or download $LAMMPS_ORIG
  (sha256 $LAMMPS_ORIG_SHA256) and set SEVENN_MF_LAMMPS_TARBALL=/path/to/it."
        if [[ ! -e "$TRIXIE_SRC_LIST" ]]; then
            log "adding Debian trixie deb-src entry: $TRIXIE_SRC_LIST"
            as_root tee "$TRIXIE_SRC_LIST" >/dev/null <<'EOF'
# added by sevenn_mf scripts/build_lammps.sh: source of LAMMPS 4 Feb 2025
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        fi
        apt_update
        entry=$(showsrc_entry)
        [[ -n "$entry" ]] || die "apt has no source package providing $LAMMPS_ORIG after apt-get update
  (offline, or no access to deb.debian.org?). See $TRIXIE_SRC_LIST; or set SEVENN_MF_LAMMPS_TARBALL."
    fi
    local deb_ver sha
    read -r deb_ver sha <<<"$entry"
    [[ "$sha" == "$LAMMPS_ORIG_SHA256" ]] ||
        die "apt-cache showsrc lists sha256 $sha for $LAMMPS_ORIG, expected the pinned $LAMMPS_ORIG_SHA256"

    # the orig tarball URI as apt resolves it (the .dsc may 404; only the tarball is needed)
    local uri
    uri=$(cd "$dl_dir" && apt-get source --print-uris "lammps=$deb_ver" 2>/dev/null |
        awk -v orig="$LAMMPS_ORIG" '$2 == orig { gsub("\047", "", $1); print $1; exit }' || true)
    [[ -n "$uri" ]] || die "apt-get source --print-uris lammps=$deb_ver gave no URI for $LAMMPS_ORIG"
    log "downloading $LAMMPS_ORIG (132 MB) from $uri"
    rm -f "$tarball.part"
    if [[ -x /usr/lib/apt/apt-helper ]]; then
        /usr/lib/apt/apt-helper download-file "$uri" "$tarball.part" "SHA256:$sha" >>"$LOGFILE" 2>&1 ||
            curl -fsSL --retry 3 -o "$tarball.part" "$uri" >>"$LOGFILE" 2>&1 ||
            die "download of $uri failed (offline?); see $LOGFILE"
    else
        curl -fsSL --retry 3 -o "$tarball.part" "$uri" >>"$LOGFILE" 2>&1 ||
            die "download of $uri failed (offline?); see $LOGFILE"
    fi
    echo "$LAMMPS_ORIG_SHA256  $tarball.part" | sha256sum -c --status ||
        die "sha256 mismatch for the downloaded $LAMMPS_ORIG"
    mv "$tarball.part" "$tarball"
    TARBALL="$tarball"
}

# --------------------------------------------------------------------------
# unpack + sevenn_patch_lammps + our patches
prepare_source() {
    local dir=$1
    local src="$dir/src"
    if [[ -f "$src/.sevenn_mf_prepared" ]] && [[ "$(cat "$src/.sevenn_mf_prepared")" == "$PATCH_HASH" ]]; then
        log "reusing prepared source $src/$LAMMPS_TOPDIR"
        return 0
    fi
    rm -rf "$src" "$dir/build"
    mkdir -p "$src"
    log "unpacking $LAMMPS_ORIG"
    tar -C "$src" -xJf "$TARBALL" \
        --exclude="$LAMMPS_TOPDIR/examples" --exclude="$LAMMPS_TOPDIR/bench" ||
        die "unpacking $TARBALL failed"
    local root="$src/$LAMMPS_TOPDIR"
    [[ -f "$root/src/version.h" ]] || die "unexpected tarball layout (no $LAMMPS_TOPDIR/src/version.h)"

    log "running sevenn_patch_lammps"
    {
        echo "== sevenn_patch_lammps $root"
        "$PYTHON" -m sevenn.main.sevenn_patch_lammps "$root"
    } >>"$LOGFILE" 2>&1 || die "sevenn_patch_lammps failed; see $LOGFILE"
    [[ -f "$root/src/pair_e3gnn_parallel.cpp" ]] || die "sevenn_patch_lammps did not copy pair_e3gnn files; see $LOGFILE"

    local p
    for p in "$PATCH_DIR"/*.patch; do
        [[ -e "$p" ]] || continue
        log "applying patches/$(basename "$p")"
        {
            echo "== patch -p1 < $p"
            patch -d "$root" -p1 --forward --batch --no-backup-if-mismatch <"$p"
        } >>"$LOGFILE" 2>&1 || die "patch $(basename "$p") does not apply; see $LOGFILE"
    done
    echo "$PATCH_HASH" >"$src/.sevenn_mf_prepared"
}

# --------------------------------------------------------------------------
progress_filter() {
    # make output -> log file (full) + a line per ~10% and compiler errors on stderr
    local kind=$1
    tee -a "$LOGFILE" | awk -v kind="$kind" '
        /^\[ *[0-9]+%\]/ {
            p = substr($0, 2, 4) + 0
            if (p >= last + 10 || (p == 100 && last < 100)) {
                last = p
                printf "[build_lammps] %s: make %3d%%\n", kind, p > "/dev/stderr"
                fflush("/dev/stderr")
            }
            next
        }
        / error: |^make.*Error/ { print "[build_lammps] " $0 > "/dev/stderr"; fflush("/dev/stderr") }
    '
}

configure_and_build() {
    local kind=$1 dir=$2
    local root="$dir/src/$LAMMPS_TOPDIR"
    local bdir="$dir/build"
    local torch_prefix
    torch_prefix=$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null) ||
        die "cannot import torch with $PYTHON"
    local args=(
        -S "$root/cmake" -B "$bdir"
        -DCMAKE_BUILD_TYPE=Release
        -DCMAKE_PREFIX_PATH="$torch_prefix"
        -DMKL_INCLUDE_DIR=/usr/include
        -DBUILD_OMP=ON
        -DDOWNLOAD_POTENTIALS=OFF
        -DWITH_JPEG=OFF -DWITH_PNG=OFF -DWITH_FFMPEG=OFF
    )
    if [[ $kind == mpi ]]; then
        args+=(-DBUILD_MPI=ON)
    else
        args+=(-DBUILD_MPI=OFF -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON)
    fi
    log "$kind: cmake configure"
    {
        echo "== cmake ${args[*]}"
        cmake "${args[@]}"
    } >>"$LOGFILE" 2>&1 || {
        tail -n 30 "$LOGFILE" >&2
        die "cmake configure failed; see $LOGFILE"
    }
    log "$kind: make -j$JOBS (takes minutes; full output in $LOGFILE)"
    local t0=$SECONDS
    echo "== cmake --build $bdir -j $JOBS" >>"$LOGFILE"
    if ! cmake --build "$bdir" -j "$JOBS" 2>&1 | progress_filter "$kind"; then
        grep -E ' error: |Error [0-9]' "$LOGFILE" | tail -n 20 >&2 || true
        die "$kind: build failed; see $LOGFILE"
    fi
    log "$kind: make finished in $((SECONDS - t0)) s"
    [[ -x "$bdir/lmp" ]] || die "$kind: build finished but $bdir/lmp is missing; see $LOGFILE"
}

check_lmp() {
    # the binary must run and list the e3gnn pair styles
    local lmp=$1 kind=$2
    local styles
    styles=$(OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "$lmp" -h 2>&1 </dev/null | grep -oE 'e3gnn(/parallel)?' | sort -u | tr '\n' ' ') || true
    [[ "$styles" == *"e3gnn "* && "$styles" == *"e3gnn/parallel"* ]] ||
        die "$kind: $lmp -h does not list pair styles e3gnn and e3gnn/parallel (got: '${styles}')"
}

# --------------------------------------------------------------------------
build_one() {
    local kind=$1
    local key dir lmp
    key=$(key_for "$kind")
    dir="$CACHE_ROOT/$key"
    lmp="$dir/bin/lmp"
    if [[ $FORCE -eq 0 && -x "$lmp" && -f "$dir/bin/.stamp" && "$(cat "$dir/bin/.stamp")" == "$PATCH_HASH" ]]; then
        log "$kind: cached $lmp"
        RESULT="$lmp"
        return 0
    fi

    mkdir -p "$dir"
    # one build per key at a time (e.g. two test sessions)
    exec 9>"$dir/.lock"
    if ! flock -n 9; then
        log "$kind: another build of $key is running; waiting for it"
        flock 9
    fi
    if [[ $FORCE -eq 0 && -x "$lmp" && -f "$dir/bin/.stamp" && "$(cat "$dir/bin/.stamp")" == "$PATCH_HASH" ]]; then
        log "$kind: cached $lmp"
        RESULT="$lmp"
        exec 9>&-
        return 0
    fi
    [[ -x "$lmp" ]] && log "$kind: rebuilding (patches changed or --force)"
    rm -rf "$dir/bin"

    LOGFILE="$dir/build.log"
    : >"$LOGFILE"
    log "$kind: building into $dir (log: $LOGFILE)"
    local t0=$SECONDS
    ensure_deps "$kind"
    fetch_tarball
    prepare_source "$dir"
    configure_and_build "$kind" "$dir"

    mkdir -p "$dir/bin"
    cp "$dir/build/lmp" "$lmp.tmp"
    mv "$lmp.tmp" "$lmp"
    check_lmp "$lmp" "$kind"
    if [[ $KEEP_TREE -eq 0 ]]; then
        rm -rf "$dir/build" "$dir/src"
        check_lmp "$lmp" "$kind" # still runs without the build tree
    fi
    {
        echo "lammps=$LAMMPS_DEB_UPSTREAM sevenn=$SEVENN_VER torch=$TORCH_VER kind=$kind"
        echo "patches=$PATCH_HASH built=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$((SECONDS - t0))"
    } >"$dir/bin/BUILD_INFO"
    echo "$PATCH_HASH" >"$dir/bin/.stamp"
    log "$kind: done in $((SECONDS - t0)) s: $lmp"
    exec 9>&-
    RESULT="$lmp"
}

declare -A PATHS=()
for kind in "${KINDS[@]}"; do
    RESULT=""
    build_one "$kind"
    PATHS[$kind]="$RESULT"
done
# stdout: only the path(s); serial last when both were built
[[ -n "${PATHS[mpi]:-}" ]] && echo "${PATHS[mpi]}"
[[ -n "${PATHS[serial]:-}" ]] && echo "${PATHS[serial]}"
exit 0
