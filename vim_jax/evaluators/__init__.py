"""Metrics of trained runs: FID / IS, PSNR / SSIM, and the numbers papers report."""
