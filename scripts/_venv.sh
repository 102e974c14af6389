# Shared by demo.sh, test.sh and lint.sh: make (or reuse) the virtual environment
# $venv at the repository root and install the package with the extra $extra.
# The caller sets venv and extra, cds to the repository root, then sources this.
# PYTHON picks the interpreter that creates the environment (default python3).
export PIP_DISABLE_PIP_VERSION_CHECK=1

die() {
    echo "error: $*" >&2
    exit 1
}

# A usable environment has a working Python 3.11+ and pip; anything else (a
# half-created directory, an interpreter upgraded away) is rebuilt from scratch.
healthy() {
    "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null &&
        "$venv/bin/python" -m pip --version >/dev/null 2>&1
}

if ! healthy; then
    python=${PYTHON:-python3}
    command -v "$python" >/dev/null || die "$python not found; shmflush needs Python 3.11+"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "shmflush needs Python 3.11+; $python is $("$python" -V 2>&1)"
    rm -rf "$venv"
    "$python" -m venv "$venv" ||
        die "'$python -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
fi

# Reinstall only when pyproject.toml (or where the checkout lives) changed; the
# install is editable, so source edits need none.  One stamp per extra, because
# test.sh and lint.sh share .venv-test.
tag=${extra//[][]/}
stamp="$venv/.shmflush-installed${tag:+-$tag}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD .$extra"
if [[ ! -f $stamp || "$(<"$stamp")" != "$want" ]]; then
    rm -f "$stamp"
    "$venv/bin/python" -m pip install -q -e ".$extra"
    printf '%s\n' "$want" >"$stamp"
fi

"$venv/bin/python" -c 'import ctypes; ctypes.CDLL("libatomic.so.1")' 2>/dev/null ||
    die "libatomic.so.1 not found (Debian/Ubuntu: apt-get install libatomic1)"
