//! Exactness of `contrastive_step`: accumulation with RNG replay, and W ranks (threads over an
//! in-process collective, dropout on) against plain autograd on the concatenated batch in one
//! process, `logit_scale` included.

use std::sync::{Arc, Barrier, Condvar, Mutex};

use ferroclip::dist::grad_buckets::GradSync;
use ferroclip::dist::single::Single;
use ferroclip::dist::Collective;
use ferroclip::loss::ClipLoss;
use ferroclip::model::ContrastiveModel;
use ferroclip::optim::{AdamW, AdamWConfig};
use ferroclip::step::contrastive_step;
use tch::{Device, Kind, Tensor};

const DIN_IMG: i64 = 6;

/// torch's RNG is process-global: tests that seed it must not run concurrently.
static RNG: Mutex<()> = Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}
const DIN_TXT: i64 = 5;

/// Two small MLP towers; the image tower has dropout so that the RNG replay matters.
struct Tiny {
    params: Vec<(String, Tensor)>,
    dropout: f64,
}

impl Tiny {
    fn init() -> Vec<(String, Tensor)> {
        tch::manual_seed(42);
        let o = (Kind::Float, Device::Cpu);
        vec![
            ("visual.fc1.weight".into(), Tensor::randn([DIN_IMG, 16], o) * 0.5),
            ("visual.fc1.bias".into(), Tensor::randn([16], o) * 0.1),
            ("visual.proj".into(), Tensor::randn([16, 4], o) * 0.5),
            ("text.fc.weight".into(), Tensor::randn([DIN_TXT, 4], o) * 0.5),
            ("text.fc.bias".into(), Tensor::randn([4], o) * 0.1),
            ("logit_scale".into(), Tensor::from(2.0f32)),
        ]
    }

    fn new(init: &[(String, Tensor)], dropout: f64) -> Tiny {
        let params = init.iter().map(|(n, t)| (n.clone(), t.copy().set_requires_grad(true))).collect();
        Tiny { params, dropout }
    }

    fn p(&self, i: usize) -> &Tensor {
        &self.params[i].1
    }

    fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.grad().copy()).collect()
    }
}

impl ContrastiveModel for Tiny {
    fn encode_image(&self, images: &Tensor, train: bool) -> Tensor {
        let h = (images.matmul(self.p(0)) + self.p(1)).relu(); // [b, 16]
        let h = h.dropout(self.dropout, train && self.dropout > 0.0);
        h.matmul(self.p(2)) // [b, 4]
    }
    fn encode_text(&self, tokens: &Tensor, _train: bool) -> Tensor {
        tokens.matmul(self.p(3)) + self.p(4) // [b, 4]
    }
    fn logit_scale(&self) -> Tensor {
        self.p(5).shallow_clone()
    }
}

fn batch(n: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let img = Tensor::randn([n, DIN_IMG], (Kind::Float, Device::Cpu));
    let txt = Tensor::randn([n, DIN_TXT], (Kind::Float, Device::Cpu)) + img.narrow(1, 0, DIN_TXT);
    (img, txt)
}

fn split(b: &(Tensor, Tensor), parts: i64) -> Vec<(Tensor, Tensor)> {
    b.0.chunk(parts, 0).into_iter().zip(b.1.chunk(parts, 0)).collect()
}

fn assert_grads_close(got: &[Tensor], want: &[Tensor], names: &[(String, Tensor)], what: &str) {
    for ((g, w), (n, _)) in got.iter().zip(want).zip(names) {
        let scale = w.abs().max().double_value(&[]).max(1e-3);
        let d = (g - w).abs().max().double_value(&[]);
        assert!(d <= 2e-5 * scale.max(1.0), "{what}: {n} gradient differs by {d} (scale {scale})");
        assert!(w.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{what}: {n} has a zero gradient");
    }
}

#[test]
fn accumulation_replays_dropout_masks_and_matches_full_graph() {
    let _rng = rng_lock();
    let init = Tiny::init();
    let data = batch(12, 7);
    let seed = 1000;
    // The step: 3 micro-batches of 4, cached features then recompute.
    let m = Tiny::new(&init, 0.3);
    let out = contrastive_step(&m, &split(&data, 3), &Single, &ClipLoss::default(), seed, None);
    // Reference: one graph over the same three forwards (same seeds), plain autograd.
    let r = Tiny::new(&init, 0.3);
    let (mut fi, mut ft) = (vec![], vec![]);
    for (i, (img, txt)) in split(&data, 3).iter().enumerate() {
        tch::manual_seed(seed + i as i64);
        fi.push(r.encode_image(img, true));
        ft.push(r.encode_text(txt, true));
    }
    let l = ClipLoss::default().forward(&Tensor::cat(&fi, 0), &Tensor::cat(&ft, 0), &r.logit_scale(), 0, 1);
    l.backward();
    assert!((out.loss.double_value(&[]) - l.double_value(&[])).abs() < 1e-5);
    assert_eq!(out.global_batch, 12);
    assert_grads_close(&m.grads(), &r.grads(), &init, "accum k=3 vs full graph");
}

#[test]
fn accumulation_k3_equals_one_step_on_3b() {
    let _rng = rng_lock();
    let init = Tiny::init();
    let data = batch(12, 8);
    let a = Tiny::new(&init, 0.0);
    let la = contrastive_step(&a, &split(&data, 3), &Single, &ClipLoss::default(), 5, None).loss;
    let b = Tiny::new(&init, 0.0);
    let lb = contrastive_step(&b, &[data], &Single, &ClipLoss::default(), 5, None).loss;
    assert!((la.double_value(&[]) - lb.double_value(&[])).abs() < 1e-5);
    assert_grads_close(&a.grads(), &b.grads(), &init, "k=3 vs 3B");
}

/// Serializes the rank threads' use of torch's process-global RNG: a rank holds the baton from the
/// start of its step to its first collective, between collectives, and from its last one to the end,
/// so that the seeded dropout draws of two ranks never interleave (as they cannot across processes).
#[derive(Default)]
struct Baton {
    held: Mutex<bool>,
    free: Condvar,
}

impl Baton {
    fn acquire(&self) {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.free.wait(held).unwrap();
        }
        *held = true;
    }

    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.free.notify_one();
    }
}

/// An in-process collective over threads: each op deposits, waits, reads in rank order, waits.
/// Each rank thread holds the [`Baton`] outside its collectives.
struct ThreadCollective {
    rank: usize,
    world: usize,
    slots: Arc<Mutex<Vec<Option<Tensor>>>>,
    barrier: Arc<Barrier>,
    baton: Arc<Baton>,
}

impl ThreadCollective {
    fn exchange(&self, t: &Tensor) -> Vec<Tensor> {
        self.baton.release();
        self.slots.lock().unwrap()[self.rank] = Some(t.detach().copy());
        self.barrier.wait();
        let all = self.slots.lock().unwrap().iter().map(|s| s.as_ref().unwrap().copy()).collect();
        self.barrier.wait();
        self.baton.acquire();
        all
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &mut Tensor) {
        let all = self.exchange(t);
        let sum = all.iter().skip(1).fold(all[0].copy(), |a, b| a + b);
        tch::no_grad(|| t.copy_(&sum));
    }
    fn all_gather(&self, t: &Tensor) -> Tensor {
        Tensor::cat(&self.exchange(t), 0)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) {
        let all = self.exchange(t);
        tch::no_grad(|| t.copy_(&all[root]));
    }
    fn barrier(&self) {
        self.baton.release();
        self.barrier.wait();
        self.baton.acquire();
    }
}

/// The one-process reference for W ranks of k micro-batches each: plain autograd over the whole
/// batch, each micro-batch's forward under the seed the step gives it (rank r's step seed + i), and
/// OpenCLIP's loss written out (normalize, `exp(logit_scale)` · image @ textᵀ, mean of both cross
/// entropies).
fn one_process_reference(model: &Tiny, ranks: &[Vec<(Tensor, Tensor)>], seeds: &[i64]) -> f64 {
    let (mut fi, mut ft) = (vec![], vec![]);
    for (micro, &seed) in ranks.iter().zip(seeds) {
        for (i, (img, txt)) in micro.iter().enumerate() {
            tch::manual_seed(seed + i as i64);
            fi.push(model.encode_image(img, true));
            ft.push(model.encode_text(txt, true));
        }
    }
    let unit = |f: &[Tensor]| {
        let f = Tensor::cat(f, 0);
        let norm = f.norm_scalaropt_dim(2, [1], true);
        &f / norm
    };
    let (img, txt) = (unit(&fi), unit(&ft));
    let logits = img.matmul(&txt.tr()) * model.logit_scale().exp();
    let labels = Tensor::arange(logits.size()[0], (Kind::Int64, Device::Cpu));
    let loss = (logits.cross_entropy_for_logits(&labels) + logits.tr().cross_entropy_for_logits(&labels)) / 2.0;
    loss.backward();
    loss.double_value(&[])
}

/// W = 2 ranks with per-rank batch B (as k = 2 micro-batches), dropout on, against one process on 2B.
fn two_ranks_equal_one_process(local_loss: bool, flat_adamw: bool) {
    let _rng = rng_lock();
    let init = Tiny::init();
    let data = batch(8, 9);
    let world = 2;
    let ranks: Vec<Vec<(Tensor, Tensor)>> =
        (0..world).map(|r| split(&(data.0.narrow(0, 4 * r, 4), data.1.narrow(0, 4 * r, 4)), 2)).collect();
    let seeds = [3, 103];
    let reference = Tiny::new(&init, 0.3);
    let want_loss = one_process_reference(&reference, &ranks, &seeds);
    let want = reference.grads();

    let slots = Arc::new(Mutex::new(vec![None, None]));
    let barrier = Arc::new(Barrier::new(world as usize));
    let baton = Arc::new(Baton::default());
    let handles: Vec<_> = (0..world as usize)
        .map(|rank| {
            let (slots, barrier, baton) = (slots.clone(), barrier.clone(), baton.clone());
            let coll = ThreadCollective { rank, world: world as usize, slots, barrier, baton };
            let init: Vec<(String, Tensor)> = init.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            let mine: Vec<(Tensor, Tensor)> = ranks[rank].iter().map(|(i, t)| (i.copy(), t.copy())).collect();
            let seed = seeds[rank];
            std::thread::spawn(move || {
                coll.baton.acquire();
                let m = Tiny::new(&init, 0.3);
                let opt = flat_adamw.then(|| AdamW::new(&m.params, AdamWConfig::default()).unwrap());
                // A tiny bucket cap: several buckets, each summed on its own.
                let mut sync = opt.as_ref().map(|opt| GradSync::new(opt, &coll, 1e-4, true).unwrap());
                let out = contrastive_step(&m, &mine, &coll, &ClipLoss { local_loss }, seed, sync.as_ref());
                match sync.as_mut() {
                    Some(sync) => sync.finish(&coll),
                    // Parameter by parameter, as a plain all-reduce would.
                    None => m.params.iter().for_each(|(_, p)| coll.all_reduce_sum(&mut p.grad())),
                }
                coll.baton.release();
                (out.loss.double_value(&[]), out.global_batch, m.grads())
            })
        })
        .collect();
    for h in handles {
        let (l, n, grads) = h.join().unwrap();
        assert!((l - want_loss).abs() < 1e-5, "loss {l} vs {want_loss}");
        assert_eq!(n, 8);
        assert_grads_close(&grads, &want, &init, &format!("W=2 local_loss={local_loss}"));
    }
}

#[test]
fn two_ranks_equal_one_process_global_loss() {
    two_ranks_equal_one_process(false, false);
}

#[test]
fn two_ranks_equal_one_process_local_loss() {
    two_ranks_equal_one_process(true, true);
}
