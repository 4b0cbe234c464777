"""Which core a plugin was built for: its `Requires-Dist` on `jaxattn`, checked at discovery.

A plugin is written against the core's API at one version (`OperationImpl`, the fields of
`AttentionInputs`, the hooks); a core that changed them breaks the plugin in ways that
surface late, as wrong results or errors inside a kernel. So every plugin pins the range of
core versions it was tested with in its dependencies (`"jaxattn>=0.1,<0.2"`), and discovery
reads that pin from the plugin's installed metadata before importing it: a plugin whose
range excludes the running core is reported as broken, with both versions, and is not
imported. pip normally prevents the mismatch; it still happens with `--no-deps`, editable
installs, a core upgraded after the plugin, or a plugin copied onto `sys.path`.

The comparison is PEP 440's, written here because the core depends on no packaging
library: `==` (with `.*`), `!=`, `<`, `<=`, `>`, `>=`, `~=` and `===`, with pre-, post- and
dev-releases ordered as PEP 440 orders them. The running core itself may be a pre-release.
A requirement under an environment marker (`; python_version < "3.12"`, `; extra == "x"`)
is left to pip: which marker applies is pip's decision, not discovery's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ._version import __version__

_VERSION = re.compile(
    r"""^v?(?:(?P<epoch>\d+)!)?(?P<release>\d+(?:\.\d+)*)
    (?:[-_.]?(?P<pre_l>a|b|c|rc|alpha|beta|pre|preview)[-_.]?(?P<pre_n>\d*))?
    (?:-(?P<post_n1>\d+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>\d*))?
    (?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>\d*))?
    (?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?$""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_PHASE = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}
_CLAUSE = re.compile(r"^(===|==|!=|~=|<=|>=|<|>)\s*(\S+)$")
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;()]*)\)?\s*(;.*)?$")
_INF = float("inf")


class Version:
    """A PEP 440 version, ordered as PEP 440 orders versions (local labels are ignored)."""

    def __init__(self, text: str) -> None:
        found = _VERSION.match(text.strip())
        if found is None:
            raise ValueError(f"version: {text!r} is not a PEP 440 version")
        self.text = text.strip()
        self.written_release = tuple(int(p) for p in found["release"].split("."))
        release = list(self.written_release)
        while len(release) > 1 and release[-1] == 0:
            release.pop()
        self.release = tuple(release)  # 1.0 == 1.0.0
        self.epoch = int(found["epoch"] or 0)
        self.pre = None if found["pre_l"] is None else (_PRE_PHASE[found["pre_l"].lower()], int(found["pre_n"] or 0))
        post = found["post_n1"] or found["post_n2"]
        self.post = None if post is None and found["post_l"] is None else int(post or 0)
        self.dev = None if found["dev_l"] is None else int(found["dev_n"] or 0)

    @property
    def is_prerelease(self) -> bool:
        return self.pre is not None or self.dev is not None

    def key(self) -> tuple[object, ...]:
        # A dev release of a final version sorts before its pre-releases: 1.0.dev0 < 1.0a1 < 1.0.
        pre: tuple[float, float] = self.pre if self.pre is not None else ((-_INF, 0) if self.dev is not None
                                                                           and self.post is None else (_INF, 0))
        post = -_INF if self.post is None else self.post
        dev = _INF if self.dev is None else self.dev
        return (self.epoch, self.release, pre, post, dev)

    def base(self) -> tuple[int, tuple[int, ...]]:
        return (self.epoch, self.release)


def _padded(release: tuple[int, ...], length: int) -> tuple[int, ...]:
    return release + (0,) * (length - len(release))


def _starts_with(version: Version, epoch: int, prefix: tuple[int, ...]) -> bool:
    return version.epoch == epoch and _padded(version.release, len(prefix))[: len(prefix)] == prefix


def _clause_allows(op: str, target: str, version: Version) -> bool:
    if op == "===":
        return version.text == target
    if target.endswith(".*"):
        if op not in ("==", "!="):
            raise ValueError(f"specifier: {op}{target} (a '.*' suffix works only with == and !=)")
        stem = Version(target[:-2])
        return _starts_with(version, stem.epoch, stem.written_release) == (op == "==")
    wanted = Version(target)
    if op == "==":
        return version.key() == wanted.key()
    if op == "!=":
        return version.key() != wanted.key()
    if op == ">=":
        return version.key() >= wanted.key()
    if op == "<=":
        return version.key() <= wanted.key()
    if op == "<":  # never a pre-release of the version named, unless it is one itself
        excluded = version.is_prerelease and not wanted.is_prerelease and version.base() == wanted.base()
        return version.key() < wanted.key() and not excluded
    if op == ">":  # never a post-release of the version named, unless it is one itself
        excluded = version.post is not None and wanted.post is None and version.base() == wanted.base()
        return version.key() > wanted.key() and not excluded
    # ~=X.Y.Z: >=X.Y.Z and ==X.Y.*
    if len(wanted.written_release) < 2:
        raise ValueError(f"specifier: ~={target} needs at least two release components")
    return version.key() >= wanted.key() and _starts_with(version, wanted.epoch, wanted.written_release[:-1])


def specifier_allows(specifier: str, version: str) -> bool:
    """Does the PEP 440 `specifier` (clauses joined by commas; empty: any) allow `version`?"""
    parsed = Version(version)
    for clause in (c.strip() for c in specifier.split(",")):
        if not clause:
            continue
        found = _CLAUSE.match(clause)
        if found is None:
            raise ValueError(f"specifier: {clause!r} is not a PEP 440 version clause")
        if not _clause_allows(found[1], found[2], parsed):
            return False
    return True


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_on(requires: Iterable[str], project: str) -> str | None:
    """The version specifier of the unconditional requirement on `project` among
    `requires` (a distribution's Requires-Dist lines), '' when it names no version,
    None when there is no such requirement."""
    for line in requires:
        found = _REQUIREMENT.match(line)
        if found is None or normalize_name(found[1]) != normalize_name(project) or found[3]:
            continue
        return found[2].strip()
    return None


def core_mismatch(requires: Iterable[str], distribution: str, core_version: str = __version__) -> str:
    """Why a plugin whose Requires-Dist lines are `requires` cannot run on this core ('' if it can)."""
    specifier = requirement_on(requires, "jaxattn")
    if not specifier:
        return ""
    try:
        allowed = specifier_allows(specifier, core_version)
    except ValueError as err:
        return f"{distribution} declares a requirement on jaxattn that cannot be read ({err})"
    if allowed:
        return ""
    return (f"{distribution} was built for jaxattn{specifier}, but this is jaxattn {core_version}: "
            f"install a {distribution} release made for jaxattn {core_version}, or a jaxattn it names")
