"""A large rendered template travels to a box once: a no-op `up` sends its sha256, not its bytes.

A 50 MB template was re-sent on every `up`. What `up` sends is measured where it arrives: the
box's `box_python` is a wrapper that counts the bytes of its stdin before running python3.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest
from boxes import Box
from project import Project

#: Big enough that sending it shows, far above the payload's own size.
TEMPLATE_MB = 8


@pytest.mark.slow
def test_a_large_template_is_sent_only_when_the_box_lacks_it(project: Project, box: Box) -> None:
    sizes = box.home / "stdin-sizes"
    wrapper = box.home / "py" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = -S ]; then\n'  # the prelude: python3 -S -c ...
        f'  f=$(mktemp); cat > "$f"; wc -c < "$f" >> {sizes}\n'
        '  python3 "$@" < "$f"; rc=$?; rm -f "$f"; exit $rc\n'
        "fi\n"
        'exec python3 "$@"\n'
    )
    wrapper.chmod(0o755)
    project.host_vars = {"box_python": str(wrapper)}
    line = "0123456789abcdef" * 4 + "\n"
    project.template("big.txt", "for {{ host }}\n" + line * (TEMPLATE_MB * 2**20 // len(line)))
    project.playbook(
        "name: big\nsteps:\n  - {id: big, kind: template, src: big.txt, dest: ~/big.txt}\n"
    )

    def up_sent() -> int:
        before = len(sizes.read_text().split()) if sizes.exists() else 0
        result = project.up("box1")
        assert result.returncode == 0, result.stdout + result.stderr
        return sum(int(n) for n in sizes.read_text().split()[before:])

    size = TEMPLATE_MB * 2**20 * 0.99
    first = up_sent()
    dest = box.home / "big.txt"
    assert dest.read_text().startswith("for box1\n") and dest.stat().st_size > size
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    again = up_sent()
    assert first > size and again < 100_000, (first, again)
    assert project.steps("box1")["big"]["attempts"] == 1, "the no-op up ran nothing"

    # The box lost its copies: it asks, and gets them again (one more round trip).
    shutil.rmtree(box.home / ".bootstrap" / "blobs")
    assert up_sent() > size
    # A changed template is new content: sent, and written.
    project.template("big.txt", "small now {{ host }}\n" + line * 2000)  # 130 KB: a blob
    up_sent()
    assert dest.read_text().startswith("small now box1\n")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() != digest
