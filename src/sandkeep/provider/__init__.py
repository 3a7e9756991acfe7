"""The machine provider: Fly Machines API client and the contract the engine codes against."""

from sandkeep.provider.errors import (
    AuthError,
    CapacityError,
    ConflictError,
    HostUnavailableError,
    InvalidRequestError,
    MissingVolumeError,
    NotFoundError,
    ProviderError,
    RateLimitedError,
    TransientError,
    WaitTimeoutError,
    classify,
)

__all__ = [
    "AuthError",
    "CapacityError",
    "ConflictError",
    "HostUnavailableError",
    "InvalidRequestError",
    "MissingVolumeError",
    "NotFoundError",
    "ProviderError",
    "RateLimitedError",
    "TransientError",
    "WaitTimeoutError",
    "classify",
]
