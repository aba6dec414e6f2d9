// One photon history of the Monte Carlo X-ray transport, shared by the CPU and CUDA kernels (TDRR_HD): source and
// cone beam, Woodcock (delta) tracking through the material volume, photoelectric absorption, Compton scattering
// (Klein-Nishina times the incoherent scattering function) and Rayleigh scattering (Thomson times the squared form
// factor), an optional focused linear anti-scatter grid, and an energy-integrating detector that tallies primary,
// single-scatter and multiple-scatter energy per pixel. The tables come from torchdrr/physics/scatter_data.py.
//
// Geometry is the DRR's (design.md §2-3): world mm; the volume's voxel (i, j, k) is the box [i-1/2, i+1/2) x ... in
// index space, nearest-voxel values (Siddon's), zero outside; camera b's pixel at image coordinates (u, v) lies at
// source_b + M_b (u, v, 1). Air outside the volume is vacuum, as in the DRR.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/hd.h"
#include "philox.h"

namespace torchdrr {
namespace mc {

constexpr int kMaxMaterials = 8;
constexpr int kInteractionKinds = 3;  // photoelectric, Compton, Rayleigh (the tables' order)
constexpr int kTallies = 3;           // primary, single scatter, multiple scatter; their squares follow
constexpr float kElectronRestEnergyKeV = 510.998950f;
constexpr float kHcKeVAngstrom = 12.3984198f;  // wavelength (Å) = hc / E (keV)
constexpr float kTwoPi = 6.28318530718f;

// Everything one history reads. Pointers are to device memory on CUDA, host memory on the CPU; tables are float32.
struct TransportScene {
  const float* densities;  // [I, J, K, M] channels-last, g/cm^3 of each material
  int materials;
  int64_t size[3];
  float world_to_index[12];  // row-major [3, 4]: index = A^-1 (world, 1)

  const float* sources;       // [B, 3] world mm
  const float* ray_matrices;  // [B, 3, 3] row-major, mm per pixel (camera_raycast's)
  int height, width;
  float field[4];  // u_min, u_max, v_min, v_max in image coordinates: the irradiated detector rectangle

  const float* spectrum_energy;  // [S] keV
  const float* spectrum_cdf;     // [S] cumulative photon fraction, last = 1
  int spectrum_bins;

  float grid_start, grid_inv_step;  // uniform energy grid: E_g = start + g / inv_step, g < grid_points
  int grid_points;
  const float* interaction;  // [G, M, 3] linear attenuation per mm per g/cm^3 (photoelectric, Compton, Rayleigh)
  const float* majorant;     // [G] per mm: >= the volume's total attenuation at every voxel
  const float* efficiency;   // [G] detector absorption efficiency
  float energy_cutoff;       // keV: photons below it are absorbed where they are

  const float* compton_sf;  // [M, X] S(x) / Z of each material on x = 0 .. (X - 1) / inv_step (1/Å)
  int compton_points;
  float compton_inv_step;
  const float* rayleigh_icdf;  // [M, U] x^2 (1/Å^2) at cumulative fraction u / (U - 1) of the F^2 integral
  int rayleigh_points;
  const float* rayleigh_fraction;  // [M, G] fraction of that integral below x_max(E_g)^2

  float grid_ratio;         // focused linear grid: strip height / interspace width; 0 = no grid
  float grid_transmission;  // the grid's transmission of primary photons
  bool falloff;             // weight photons by cos^3 of their angle to the detector normal (inverse square)

  uint64_t seed;
  int64_t first_photon;  // photon indices first_photon .. first_photon + photons - 1 of each camera
};

TDRR_HD float dot3(const float* a, const float* b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }

// Linear interpolation on the uniform energy grid: index and weight of E (clamped to the grid).
struct GridPoint {
  int index;
  float t;
};

TDRR_HD GridPoint grid_point(const TransportScene& s, float energy) {
  float p = (energy - s.grid_start) * s.grid_inv_step;
  p = fminf(fmaxf(p, 0.0f), static_cast<float>(s.grid_points - 1) - 1e-3f);
  const int index = static_cast<int>(p);
  return {index, p - static_cast<float>(index)};
}

TDRR_HD float lerp_table(const float* table, int stride, GridPoint g) {
  return table[g.index * stride] * (1.0f - g.t) + table[(g.index + 1) * stride] * g.t;
}

// The detector frame of one camera, derived from its source and ray matrix.
struct DetectorFrame {
  float source[3];
  float col_u[3], col_v[3], corner[3];  // M's columns: pixel (u, v) is source + u col_u + v col_v + corner
  float normal[3];                      // unit normal of the detector plane, pointing away from the source
  float plane_distance;                 // source-to-plane distance along the normal (mm)
  float gram_inv[3];                    // inverse Gram matrix of (col_u, col_v): [a, b; b, c] stored as a, b, c
  float unit_u[3];                      // col_u / |col_u| (the grid strips run along v)
};

TDRR_HD DetectorFrame detector_frame(const TransportScene& s, int camera) {
  DetectorFrame f;
  const float* src = s.sources + 3 * camera;
  const float* m = s.ray_matrices + 9 * camera;
  for (int a = 0; a < 3; ++a) {
    f.source[a] = src[a];
    f.col_u[a] = m[3 * a + 0];
    f.col_v[a] = m[3 * a + 1];
    f.corner[a] = m[3 * a + 2];
  }
  float n[3] = {f.col_u[1] * f.col_v[2] - f.col_u[2] * f.col_v[1], f.col_u[2] * f.col_v[0] - f.col_u[0] * f.col_v[2],
                f.col_u[0] * f.col_v[1] - f.col_u[1] * f.col_v[0]};
  const float n_len = sqrtf(dot3(n, n));
  const float sign = dot3(n, f.corner) < 0.0f ? -1.0f : 1.0f;
  for (int a = 0; a < 3; ++a) f.normal[a] = sign * n[a] / n_len;
  f.plane_distance = dot3(f.normal, f.corner);
  const float a = dot3(f.col_u, f.col_u), b = dot3(f.col_u, f.col_v), c = dot3(f.col_v, f.col_v);
  const float det = a * c - b * b;
  f.gram_inv[0] = c / det;
  f.gram_inv[1] = -b / det;
  f.gram_inv[2] = a / det;
  const float u_len = sqrtf(a);
  for (int k = 0; k < 3; ++k) f.unit_u[k] = f.col_u[k] / u_len;
  return f;
}

// The world-mm interval [enter, exit] of the ray pos + s dir inside the volume's box; false if it misses.
TDRR_HD bool box_interval(const TransportScene& s, const float* pos, const float* dir, float* q0, float* dq,
                          float& enter, float& exit) {
  enter = -INFINITY;
  exit = INFINITY;
  for (int a = 0; a < 3; ++a) {
    const float* row = s.world_to_index + 4 * a;
    q0[a] = row[0] * pos[0] + row[1] * pos[1] + row[2] * pos[2] + row[3];
    dq[a] = row[0] * dir[0] + row[1] * dir[1] + row[2] * dir[2];
    const float lo = -0.5f, hi = static_cast<float>(s.size[a]) - 0.5f;
    if (dq[a] == 0.0f) {
      if (q0[a] < lo || q0[a] >= hi) return false;
      continue;
    }
    const float t1 = (lo - q0[a]) / dq[a], t2 = (hi - q0[a]) / dq[a];
    enter = fmaxf(enter, fminf(t1, t2));
    exit = fminf(exit, fmaxf(t1, t2));
  }
  return exit > fmaxf(enter, 0.0f);
}

TDRR_HD int64_t clamp_index(float q, int64_t n) {
  int64_t i = static_cast<int64_t>(floorf(q + 0.5f));
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// A direction turned by the polar angle acos(cos_theta) and azimuth phi about itself (unit vectors in, unit out).
TDRR_HD void rotate_direction(float* dir, float cos_theta, float phi) {
  const float sin_theta = sqrtf(fmaxf(0.0f, 1.0f - cos_theta * cos_theta));
  float sin_phi, cos_phi;
#if defined(__CUDA_ARCH__)
  __sincosf(phi, &sin_phi, &cos_phi);
#else
  sin_phi = sinf(phi);
  cos_phi = cosf(phi);
#endif
  const float dx = dir[0], dy = dir[1], dz = dir[2];
  const float perp = sqrtf(fmaxf(0.0f, 1.0f - dz * dz));
  if (perp < 1e-5f) {  // along z: any perpendicular frame will do
    dir[0] = sin_theta * cos_phi;
    dir[1] = sin_theta * sin_phi;
    dir[2] = (dz < 0.0f ? -1.0f : 1.0f) * cos_theta;
  } else {
    dir[0] = dx * cos_theta + sin_theta * (dx * dz * cos_phi - dy * sin_phi) / perp;
    dir[1] = dy * cos_theta + sin_theta * (dy * dz * cos_phi + dx * sin_phi) / perp;
    dir[2] = dz * cos_theta - sin_theta * cos_phi * perp;
  }
  const float inv = 1.0f / sqrtf(dot3(dir, dir));  // keep it unit despite rounding over many scatters
  for (int a = 0; a < 3; ++a) dir[a] *= inv;
}

// Compton scattering of a photon of `energy` keV in `material`: Klein-Nishina by Kahn's rejection method, then
// kept with probability S(x) / Z (binding: the incoherent scattering function). Returns cos(theta) and sets the
// scattered energy (free-electron kinematics; no Doppler broadening).
TDRR_HD float sample_compton(const TransportScene& s, PhiloxStream& rng, int material, float energy,
                             float& scattered_energy) {
  const float k = energy / kElectronRestEnergyKeV;
  const float* sf = s.compton_sf + static_cast<int64_t>(material) * s.compton_points;
  const float x_per_root = energy / kHcKeVAngstrom;  // x = sin(theta / 2) / lambda = x_per_root sqrt((1 - cos) / 2)
  for (;;) {
    float ratio, cos_theta;  // ratio = E / E'
    const float r1 = rng.uniform(), r2 = rng.uniform(), r3 = rng.uniform();
    if (r1 <= (1.0f + 2.0f * k) / (9.0f + 2.0f * k)) {
      ratio = 1.0f + 2.0f * k * r2;
      cos_theta = 1.0f - (ratio - 1.0f) / k;
      if (r3 > 4.0f * (1.0f / ratio - 1.0f / (ratio * ratio))) continue;
    } else {
      ratio = (1.0f + 2.0f * k) / (1.0f + 2.0f * k * r2);
      cos_theta = 1.0f - (ratio - 1.0f) / k;
      if (r3 > 0.5f * (cos_theta * cos_theta + 1.0f / ratio)) continue;
    }
    cos_theta = fminf(1.0f, fmaxf(-1.0f, cos_theta));
    const float x = x_per_root * sqrtf(0.5f * (1.0f - cos_theta));
    float p = x * s.compton_inv_step;
    p = fminf(p, static_cast<float>(s.compton_points - 1) - 1e-3f);
    const int i = static_cast<int>(p);
    const float t = p - static_cast<float>(i);
    const float keep = sf[i] * (1.0f - t) + sf[i + 1] * t;
    if (rng.uniform() > keep) continue;
    scattered_energy = energy / ratio;
    return cos_theta;
  }
}

// Rayleigh scattering: x^2 drawn from the material's F^2 distribution below x_max(E)^2 (inverse-CDF table), then kept
// with the Thomson factor (1 + cos^2) / 2. Returns cos(theta); the energy is unchanged.
TDRR_HD float sample_rayleigh(const TransportScene& s, PhiloxStream& rng, int material, GridPoint g, float energy) {
  const float* icdf = s.rayleigh_icdf + static_cast<int64_t>(material) * s.rayleigh_points;
  const float fraction =
      lerp_table(s.rayleigh_fraction + static_cast<int64_t>(material) * s.grid_points, 1, g);
  const float x_max = energy / kHcKeVAngstrom;
  const float inv_x_max2 = 1.0f / (x_max * x_max);
  for (;;) {
    float p = rng.uniform() * fraction * static_cast<float>(s.rayleigh_points - 1);
    p = fminf(p, static_cast<float>(s.rayleigh_points - 1) - 1e-3f);
    const int i = static_cast<int>(p);
    const float t = p - static_cast<float>(i);
    const float x2 = icdf[i] * (1.0f - t) + icdf[i + 1] * t;
    const float cos_theta = fmaxf(-1.0f, 1.0f - 2.0f * x2 * inv_x_max2);
    if (2.0f * rng.uniform() <= 1.0f + cos_theta * cos_theta) return cos_theta;
  }
}

// One history of transport_photon: returns the photon's weight and adds the energy it leaves in each material
// (unweighted, keV) to absorbed[material].
template <typename Deposit>
TDRR_HD float transport_history(const TransportScene& s, int camera, int64_t photon, const Deposit& deposit,
                                float* absorbed) {
  PhiloxStream rng(s.seed, static_cast<uint32_t>(camera), static_cast<uint64_t>(photon));
  const DetectorFrame f = detector_frame(s, camera);

  // Energy from the spectrum (binary search of the cumulative table).
  const float r_energy = rng.uniform();
  int lo = 0, hi = s.spectrum_bins - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (s.spectrum_cdf[mid] < r_energy) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  float energy = s.spectrum_energy[lo];

  // Direction: toward a uniform point of the irradiated detector rectangle (flat fluence per pixel, the DRR's N0).
  const float u = s.field[0] + rng.uniform() * (s.field[1] - s.field[0]);
  const float v = s.field[2] + rng.uniform() * (s.field[3] - s.field[2]);
  float dir[3], pos[3];
  for (int a = 0; a < 3; ++a) dir[a] = u * f.col_u[a] + v * f.col_v[a] + f.corner[a];
  const float length = sqrtf(dot3(dir, dir));
  for (int a = 0; a < 3; ++a) {
    dir[a] /= length;
    pos[a] = f.source[a];
  }
  float weight = 1.0f;
  if (s.falloff) {
    const float c = f.plane_distance / length;
    weight = c * c * c;
  }

  int scatters = 0;
  float q0[3], dq[3], enter, exit;
  bool inside = box_interval(s, pos, dir, q0, dq, enter, exit);
  float travelled = fmaxf(enter, 0.0f);
  while (inside) {
    const GridPoint g = grid_point(s, energy);
    const float majorant = lerp_table(s.majorant, 1, g);
    travelled += -logf(rng.uniform()) / majorant;
    if (!(travelled < exit)) break;  // left the volume (also for a zero majorant: an empty volume)
    const int64_t i = clamp_index(q0[0] + travelled * dq[0], s.size[0]);
    const int64_t j = clamp_index(q0[1] + travelled * dq[1], s.size[1]);
    const int64_t k = clamp_index(q0[2] + travelled * dq[2], s.size[2]);
    const float* voxel = s.densities + ((i * s.size[1] + j) * s.size[2] + k) * s.materials;
    float partial[kMaxMaterials * kInteractionKinds];
    float total = 0.0f;
    const float* row0 = s.interaction + static_cast<int64_t>(g.index) * s.materials * kInteractionKinds;
    const float* row1 = row0 + s.materials * kInteractionKinds;
    for (int m = 0; m < s.materials; ++m) {
      const float density = voxel[m];
      for (int kind = 0; kind < kInteractionKinds; ++kind) {
        const int at = m * kInteractionKinds + kind;
        const float mu = density * (row0[at] * (1.0f - g.t) + row1[at] * g.t);
        partial[at] = mu;
        total += mu;
      }
    }
    float pick = rng.uniform() * majorant;
    if (!(pick < total)) continue;  // a virtual (delta) collision: the photon goes on unchanged
    int chosen = s.materials * kInteractionKinds - 1;
    for (int at = 0; at < s.materials * kInteractionKinds; ++at) {
      if (pick < partial[at]) {
        chosen = at;
        break;
      }
      pick -= partial[at];
    }
    const int material = chosen / kInteractionKinds, kind = chosen % kInteractionKinds;
    if (kind == 0) {  // photoelectric absorption (fluorescence is not followed)
      absorbed[material] += energy;
      return weight;
    }
    float cos_theta;
    if (kind == 1) {
      float scattered;
      cos_theta = sample_compton(s, rng, material, energy, scattered);
      absorbed[material] += energy - scattered;  // the recoil electron's energy
      energy = scattered;
    } else {
      cos_theta = sample_rayleigh(s, rng, material, g, energy);
    }
    if (energy < s.energy_cutoff) {
      absorbed[material] += energy;
      return weight;
    }
    for (int a = 0; a < 3; ++a) pos[a] += travelled * dir[a];
    rotate_direction(dir, cos_theta, kTwoPi * rng.uniform());
    ++scatters;
    inside = box_interval(s, pos, dir, q0, dq, enter, exit);
    travelled = 0.0f;
  }

  // Straight on to the detector plane.
  const float toward = dot3(dir, f.normal);
  if (!(toward > 0.0f)) return weight;
  float rel[3];
  for (int a = 0; a < 3; ++a) rel[a] = pos[a] - f.source[a];
  const float ahead = f.plane_distance - dot3(rel, f.normal);
  if (ahead < 0.0f) return weight;  // already behind the detector plane
  const float t = ahead / toward;
  float on_plane[3];
  for (int a = 0; a < 3; ++a) {
    rel[a] += t * dir[a];
    on_plane[a] = rel[a] - f.corner[a];
  }
  const float r0 = dot3(on_plane, f.col_u), r1 = dot3(on_plane, f.col_v);
  const float pu = f.gram_inv[0] * r0 + f.gram_inv[1] * r1, pv = f.gram_inv[1] * r0 + f.gram_inv[2] * r1;
  const float column = floorf(pu + 0.5f), row = floorf(pv + 0.5f);
  if (!(column >= 0.0f && column < static_cast<float>(s.width) && row >= 0.0f &&
        row < static_cast<float>(s.height))) {
    return weight;
  }
  float transmission = 1.0f;
  if (s.grid_ratio > 0.0f) {
    // A focused grid lets a photon through the interspace in proportion to 1 - ratio |tan(angle to the focal ray)|
    // in the plane across the strips (absorbing strips, no septal penetration), times its primary transmission.
    const float rel_len = sqrtf(dot3(rel, rel));
    const float focal_normal = dot3(rel, f.normal) / rel_len, focal_u = dot3(rel, f.unit_u) / rel_len;
    const float slope_photon = dot3(dir, f.unit_u) / toward, slope_focal = focal_u / focal_normal;
    transmission = s.grid_transmission * fmaxf(0.0f, 1.0f - s.grid_ratio * fabsf(slope_photon - slope_focal));
    if (transmission <= 0.0f) return weight;
  }
  const float eff = lerp_table(s.efficiency, 1, grid_point(s, energy));
  const int tally = scatters == 0 ? 0 : (scatters == 1 ? 1 : 2);
  deposit.detected(camera, tally, static_cast<int64_t>(row), static_cast<int64_t>(column),
                   weight * transmission * energy * eff);
  return weight;
}

// Transports photon `photon` of camera `camera` from the source to the detector (or to its absorption). It calls
// deposit.detected(camera, tally, row, column, value) once if it reaches a pixel: tally 0 = primary, 1 = single
// scatter, 2 = multiple scatter; value = weight x E x efficiency(E) x grid transmission, keV. And it calls
// deposit.absorbed(camera, material, value) once for each material in which it left energy: weight x (photoelectric
// E + Compton E - E' + E below the cutoff), keV, with the electrons' energy taken as absorbed where they were set
// free.
template <typename Deposit>
TDRR_HD void transport_photon(const TransportScene& s, int camera, int64_t photon, const Deposit& deposit) {
  float absorbed[kMaxMaterials];
  for (int m = 0; m < kMaxMaterials; ++m) absorbed[m] = 0.0f;
  const float weight = transport_history(s, camera, photon, deposit, absorbed);
  for (int m = 0; m < s.materials; ++m) {
    if (absorbed[m] > 0.0f) deposit.absorbed(camera, m, weight * absorbed[m]);
  }
}

}  // namespace mc
}  // namespace torchdrr
