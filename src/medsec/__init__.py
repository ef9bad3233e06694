"""medsec: the security of medical-imaging AI - defences, informed attacks, signed images."""

from medsec.errors import MedsecError

__version__ = "0.1.0"
__all__ = ["MedsecError", "__version__"]
