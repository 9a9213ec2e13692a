"""The likelihood ladder on the digits (docs/results.md): each method at the main job's length, 1000
steps, beside the pixel histogram the runner adds. Cells resume, so the sweep can be split over
sessions: `python -m ddpm_jax.ablation --grid=configs/ablations/likelihood.py [--only=ladder_vdm]`."""


def get_grid():
    vlb = {"diffusion.loss_type": "vlb", "diffusion.timestep_sampler": "importance"}
    return {
        "base": "ddpm",
        "overrides": {"training.eval_every": 250},
        "reference": "ladder_ddpm",  # the paired differences are against the paper's DDPM
        "cells": {
            "ladder_vae": {"config": "vae"},
            "ladder_hvae": {"config": "hvae"},
            "ladder_ddpm": {},  # simple loss, fixed_small, linear: the paper's setting
            "ladder_iddpm": {
                "diffusion.schedule": "cosine",
                "diffusion.variance": "learned_range",
                "diffusion.loss_type": "hybrid",
            },
            "ladder_ddpm_learned_decoder": {"diffusion.decoder": "learned"},  # L_0's scale fitted, not beta_1's
            "ladder_vlb_importance": vlb,
            "ladder_learned_schedule": {**vlb, "diffusion.schedule": "learned"},  # with the fixed decoder
            "ladder_learned_schedule_good_decoder": {  # the fixes together: the loss is the bound
                **vlb,
                "diffusion.schedule": "learned",
                "diffusion.decoder": "learned",
                "diffusion.prior_loss": True,
                "diffusion.condition_on": "log_snr",
            },
            "ladder_vdm": {"config": "vdm"},
        },
    }
