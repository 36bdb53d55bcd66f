from .nasa import NASAAttnProcessor, check_nasa_scale, nasa_attention


__all__ = ["NASAAttnProcessor", "check_nasa_scale", "nasa_attention"]
