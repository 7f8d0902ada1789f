# Build empty stand-ins for the CUDA libraries torch's wheel needs but this build machine lacks
# (only used to import torch for compiling extensions; nothing here ever runs on a GPU).
import collections, glob, os, re, subprocess
tl = '/opt/venv/lib/python3.12/site-packages/torch/lib'
def syms(path, flag):
    out = subprocess.run(['nm', '-D', flag, path], capture_output=True, text=True).stdout
    return [l.split()[-1] for l in out.splitlines() if l.strip()]
defined = set()
avail = glob.glob(tl + '/*.so*') + ['/usr/local/cuda/lib64/libcudart.so.13', '/usr/local/cuda/lib64/libcupti.so.13']
for p in avail:
    defined.update(s.split('@')[0] for s in syms(p, '--defined-only'))
missing = ['libcublas.so.13', 'libcublasLt.so.13', 'libcudnn.so.9', 'libcufft.so.12', 'libcufile.so.0',
           'libcurand.so.10', 'libcusolver.so.12', 'libcusparse.so.12', 'libcusparseLt.so.0', 'libnccl.so.2',
           'libnvrtc.so.13', 'libnvshmem_host.so.3', 'libcuda.so.1']
per = collections.defaultdict(lambda: collections.defaultdict(set))  # lib -> version -> names
prefix = [('nccl', 'libnccl.so.2'), ('curand', 'libcurand.so.10'), ('cusparseLt', 'libcusparseLt.so.0'),
          ('cuFile', 'libcufile.so.0'), ('cudnn', 'libcudnn.so.9'), ('nvshmem', 'libnvshmem_host.so.3'),
          ('cu', 'libcuda.so.1')]
for p in glob.glob(tl + '/*.so'):
    out = subprocess.run(['nm', '-D', '--undefined-only', p], capture_output=True, text=True).stdout
    for l in out.splitlines():
        kind, s = l.split()[-2:]
        name, _, ver = s.partition('@')
        if kind == 'w' or name in defined: continue
        if ver in missing: per[ver][ver].add(name); continue
        if ver == 'NVSHMEM': per['libnvshmem_host.so.3']['NVSHMEM'].add(name); continue
        if ver: continue  # glibc/libstdc++ etc.
        lib = next((l for pf, l in prefix if name.startswith(pf)), 'libnccl.so.2')
        per[lib][''].add(name)
os.makedirs('/opt/stubs', exist_ok=True)
for lib in missing:
    vers = per.get(lib, {})
    asm = ['.text']
    vs = []
    for ver, names in vers.items():
        for n in sorted(names):
            asm += [f'.globl {n}', f'.type {n},@function', f'{n}:', 'ret']
        if ver: vs.append(f'{ver} {{ global: ' + ' '.join(f'{n};' for n in sorted(names)) + ' };')
    if not any(v for v in vers): vs = []
    open('/tmp/stub.s', 'w').write('\n'.join(asm) + '\n')
    cmd = ['gcc', '-shared', '-nostdlib', '-o', f'/opt/stubs/{lib}', '/tmp/stub.s', f'-Wl,-soname,{lib}']
    if vs:
        open('/tmp/stub.map', 'w').write('\n'.join(vs) + '\n')
        cmd.append('-Wl,--version-script=/tmp/stub.map')
    subprocess.run(cmd, check=True)
    print(lib, {v: len(n) for v, n in vers.items()})
