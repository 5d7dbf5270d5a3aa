"""Which images the local node runs, and what it says about one it does not.

The local node has no container runtime: a container's command runs in this Python environment
whatever its image. So that a pod whose image could not run anywhere (a typo, a tag-less fork on
another registry, an image nobody built) fails here as it would on a real node, and not only
once it reaches one, the node "has" a fixed set of repositories: ``DEFAULT_IMAGES`` plus those
configured (``kubetune local up --image REPOSITORY``, ``LocalCluster(images=...)``). For any
other image the container waits with the kubelet's reasons (``ErrImagePull``, then
``ImagePullBackOff``) and never starts.

The matching rule is the kubelet's own name for what it pulls, ``ParseNormalizedNamed(image)
.Name()`` of github.com/distribution/reference, ported below: the tag and digest are dropped; a
first path component holding a "." or ":", or "localhost", or an upper-case letter is a
registry, else the registry is docker.io (and index.docker.io is docker.io too); on docker.io a
one-component name gets "library/". So ``busybox``, ``busybox:1.36`` and
``docker.io/library/busybox@sha256:...`` are one repository, ``kubetune/trainer:0.1.0`` is
``docker.io/kubetune/trainer``, while ``ghcr.io/kubetune/trainer`` (another registry) and
``ghcr.io/x/kubetune-trainer`` are other repositories. A name the kubelet cannot parse is
``InvalidImageName``, as there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple

DEFAULT_IMAGES = (
    # The trainer image: kubetune.api.spec.DEFAULT_TRAINER_IMAGE, which is also the operator's
    # default KUBETUNE_TRAINER_IMAGE (an operator set to another one needs it added).
    "kubetune/trainer",
    "kubetune/operator",
    # What the repository's tests and test charts run on the local node: "ignored" is their
    # stand-in for "any image", registry.example/whoami the test chart's.
    "ignored",
    "registry.example/whoami",
)
ADD_HINT = "add one with `kubetune local up --image REPOSITORY`"

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_PREFIX = "library/"
MAX_NAME_LENGTH = 255

# The grammar of github.com/distribution/reference (regexp.go), in Python's syntax.
_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"((?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)(?::({_TAG}))?(?:@({_DIGEST}))?", re.ASCII
)
_IDENTIFIER = re.compile(r"[a-f0-9]{64}")


class InvalidImageName(ValueError):
    """The image is no valid reference; the text is the parser's."""


class Reference(NamedTuple):
    repository: str  # fully qualified: docker.io/library/busybox
    tag: str | None
    digest: str | None


def parse(image: str) -> Reference:
    """``image`` as the kubelet reads it (``ParseNormalizedNamed``)."""
    if _IDENTIFIER.fullmatch(image):
        raise InvalidImageName(f"invalid repository name ({image}), cannot specify 64-byte hexadecimal strings")
    domain, remainder = _split_domain(image)
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        raise InvalidImageName(f"invalid reference format: repository name ({remote}) must be lowercase")
    match = _REFERENCE.fullmatch(f"{domain}/{remainder}")
    if match is None:
        raise InvalidImageName("invalid reference format")
    if len(match[1]) > MAX_NAME_LENGTH:
        raise InvalidImageName(f"repository name must not be more than {MAX_NAME_LENGTH} characters")
    return Reference(match[1], match[2], match[3])


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if not slash:  # a "familiar" name such as busybox:1.36
        return DEFAULT_DOMAIN, OFFICIAL_PREFIX + name
    if first == LEGACY_DEFAULT_DOMAIN:
        domain, remote = DEFAULT_DOMAIN, rest
    elif first == "localhost" or "." in first or ":" in first or first.lower() != first:
        domain, remote = first, rest
    else:
        domain, remote = DEFAULT_DOMAIN, name
    if domain == DEFAULT_DOMAIN and "/" not in remote:
        remote = OFFICIAL_PREFIX + remote
    return domain, remote


def familiar(repository: str) -> str:
    """The short name people write: docker.io/library/busybox -> busybox."""
    name = repository.removeprefix(DEFAULT_DOMAIN + "/")
    if name != repository and name.startswith(OFFICIAL_PREFIX) and name.count("/") == 1:
        name = name.removeprefix(OFFICIAL_PREFIX)
    return name


def with_default_tag(image: str, reference: Reference) -> str:
    """The kubelet's ``applyDefaultImageTag``: the name its pull messages quote."""
    return image if reference.tag or reference.digest else f"{image}:latest"


@dataclass(frozen=True)
class PullFailure:
    """Why a container cannot get its image, in the kubelet's words."""

    reason: str  # the container's waiting reason: ErrImagePull, InvalidImageName or ErrImageNeverPull
    message: str  # its waiting message
    events: tuple[tuple[str, str, str], ...]  # (type, reason, message) posted at each attempt
    backoff_message: str | None = None  # ErrImagePull only: what ImagePullBackOff says


class LocalImages:
    """The repositories this node runs, any tag or digest: DEFAULT_IMAGES and ``extra``."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        # A bad configured name raises InvalidImageName here, when the cluster is set up.
        self.repositories = frozenset(parse(image).repository for image in (*DEFAULT_IMAGES, *extra))

    def names(self) -> list[str]:
        return sorted(familiar(repository) for repository in self.repositories)

    def ensure(self, image: str, pull_policy: str | None) -> PullFailure | None:
        """The kubelet's ``EnsureImageExists`` on a node whose images are all present and
        that can pull none: None when the container may start."""
        try:
            reference = parse(image)
        except InvalidImageName as err:
            message = f'Failed to apply default image tag "{image}": couldn\'t parse image name "{image}": {err}'
            return PullFailure("InvalidImageName", message, (("Warning", "InspectFailed", message),))
        if reference.repository in self.repositories:
            return None
        if pull_policy == "Never":
            message = f'Container image "{image}" is not present with pull policy of Never'
            return PullFailure("ErrImageNeverPull", message, (("Warning", "ErrImageNeverPull", message),))
        tagged = with_default_tag(image, reference)
        # Worded like containerd's pull error, then what the user can do about it here.
        error = (
            f'failed to resolve reference "{tagged}": repository {reference.repository} is not one the kubetune '
            f"local node runs (any tag or digest of: {', '.join(self.names())}); {ADD_HINT}"
        )
        return PullFailure(
            "ErrImagePull", error,
            (("Normal", "Pulling", f'Pulling image "{tagged}"'),
             ("Warning", "Failed", f'Failed to pull image "{tagged}": {error}')),
            backoff_message=f'Back-off pulling image "{tagged}"',
        )
